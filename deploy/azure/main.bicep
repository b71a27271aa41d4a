// castvault for one region: a zone-redundant storage account and container for recordings, a
// user-assigned managed identity allowed to write blobs, and recorder VMs in a scale set spread
// over availability zones 1-3, each joining the tailnet with Tailscale.
//
//   az deployment group create -g castvault-eu -f deploy/azure/main.bicep \
//     -p regionName=eu tailscaleAuthKey=<key> adminPublicKey=@~/.ssh/id_ed25519.pub

@description('castvault region name: the suffix of recording ids and the key in [regions.NAME].')
param regionName string

@description('Azure location; defaults to the resource group\'s.')
param location string = resourceGroup().location

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'castvault${uniqueString(resourceGroup().id)}'

@description('Recorder VMs; two or more, spread over the zones.')
@minValue(2)
param recorderCount int = 3

param vmSize string = 'Standard_D4ds_v5'

@description('Tailscale auth key for the recorders (tagged tag:recorder-REGION in the policy).')
@secure()
param tailscaleAuthKey string

param adminUsername string = 'castvault'

@description('SSH public key for break-glass access.')
param adminPublicKey string

@description('castvault release to install.')
param castvaultVersion string = '0.1.0'

var containerName = 'recordings'
// Built-in role: Storage Blob Data Contributor.
var blobDataContributor = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'ba92f5b4-2d11-453d-a403-e96b0029c9fe')

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  sku: {
    name: 'Standard_ZRS'
  }
  kind: 'StorageV2'
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 30
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 30
    }
  }
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'castvault-${regionName}'
  location: location
}

resource blobWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, identity.id, blobDataContributor)
  scope: container
  properties: {
    roleDefinitionId: blobDataContributor
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: 'castvault-${regionName}'
  location: location
  properties: {
    addressSpace: {
      addressPrefixes: [
        '10.42.0.0/16'
      ]
    }
    subnets: [
      {
        name: 'recorders'
        properties: {
          addressPrefix: '10.42.0.0/24'
        }
      }
    ]
  }
}

// Multi-line strings do not interpolate in Bicep: the files are joined from lines.
var config = join([
  'region = "${regionName}"'
  'data_dir = "/var/lib/castvault"'
  'ingest_listen = "0.0.0.0:80"'
  'web_listen = "127.0.0.1:8081"'
  'ack = "storage"'
  ''
  '[regions.${regionName}]'
  'store = "az://${containerName}"'
  'store_options = { account_name = "${storageAccountName}", client_id = "${identity.properties.clientId}" }'
  ''
  '# Only this region\'s Tailscale SSH servers may send recordings (tailscaled WhoIs).'
  '[admission]'
  'whois_socket = "/var/run/tailscale/tailscaled.sock"'
  'allow_tags = ["tag:${regionName}"]'
], '\n')

var release = 'https://github.com/castvault/castvault/releases/download/v${castvaultVersion}'

var cloudInit = join([
  '#cloud-config'
  'write_files:'
  '  - path: /etc/castvault/castvault.toml'
  '    encoding: b64'
  '    content: ${base64(config)}'
  'runcmd:'
  '  - curl -fsSL https://tailscale.com/install.sh | sh'
  '  - tailscale up --auth-key=${tailscaleAuthKey} --advertise-tags=tag:recorder-${regionName} --hostname=castvault-${regionName}-$(hostname)'
  '  - curl -fsSL -o /usr/local/bin/castvault ${release}/castvault-x86_64-linux'
  '  - chmod 755 /usr/local/bin/castvault'
  '  - curl -fsSL -o /etc/systemd/system/castvault.service ${release}/castvault.service'
  '  - systemctl daemon-reload'
  '  - systemctl enable --now castvault'
], '\n')

resource recorders 'Microsoft.Compute/virtualMachineScaleSets@2024-03-01' = {
  name: 'castvault-${regionName}'
  location: location
  zones: [
    '1'
    '2'
    '3'
  ]
  sku: {
    name: vmSize
    capacity: recorderCount
  }
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    orchestrationMode: 'Uniform'
    zoneBalance: true
    platformFaultDomainCount: 1
    upgradePolicy: {
      mode: 'Rolling'
      rollingUpgradePolicy: {
        maxBatchInstancePercent: 34
        pauseTimeBetweenBatches: 'PT1M'
      }
    }
    automaticRepairsPolicy: {
      enabled: true
      gracePeriod: 'PT10M'
    }
    virtualMachineProfile: {
      osProfile: {
        computerNamePrefix: 'cv${regionName}'
        adminUsername: adminUsername
        customData: base64(cloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              {
                path: '/home/${adminUsername}/.ssh/authorized_keys'
                keyData: adminPublicKey
              }
            ]
          }
        }
      }
      storageProfile: {
        imageReference: {
          publisher: 'Debian'
          offer: 'debian-12'
          sku: '12-gen2'
          version: 'latest'
        }
        osDisk: {
          createOption: 'FromImage'
          caching: 'ReadWrite'
          managedDisk: {
            storageAccountType: 'Premium_LRS'
          }
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'ipconfig'
                  properties: {
                    subnet: {
                      id: vnet.properties.subnets[0].id
                    }
                  }
                }
              ]
            }
          }
        ]
      }
      extensionProfile: {
        extensions: [
          {
            name: 'health'
            properties: {
              publisher: 'Microsoft.ManagedServices'
              type: 'ApplicationHealthLinux'
              typeHandlerVersion: '1.0'
              autoUpgradeMinorVersion: true
              settings: {
                protocol: 'http'
                port: 8081
                requestPath: '/readyz'
              }
            }
          }
        ]
      }
    }
  }
  dependsOn: [
    blobWriter
  ]
}

output storageAccount string = storage.name
output container string = container.name
output identityClientId string = identity.properties.clientId

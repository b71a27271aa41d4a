#!/usr/bin/env bash
# Writes the seed corpus under fuzz/corpus/: recordings made by a real node (the debug binary)
# from the bench corpus and from hand-written edge cases, their stored chunks, manifests and
# seals, raw HTTP/1.1 requests, and the project's config files. Run from the repository root
# after `cargo build`; the output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug/castvault
out=fuzz/corpus
rm -rf "$out"
mkdir -p "$out"/{cast_parse,http1_ingest,chunk_decode,manifest,config}

casts=$(mktemp -d)
trap 'kill "$node" 2>/dev/null || true; rm -rf "$casts"' EXIT
hdr='{"version":2,"width":203,"height":38,"timestamp":1679441819,"srcNode":"laptop.example.ts.net","srcNodeID":"nguedK2CNTRL","srcNodeUserID":30585448562688899,"srcNodeUser":"alice@example.com","env":{"TERM":"xterm-256color"},"sshUser":"alice","localUser":"alice","connectionID":"ssh-conn-20230321T233659-0a1b2c3d4e"}'
printf '%s\n[0.456997416,"o","Last login: …\\r\\n"]\n[1.500827583,"o","e"]\n' "$hdr" >"$casts/ssh.cast"
printf '{"version":2,"width":80,"height":24,"timestamp":1.7e9,"kubernetes":{"PodName":"web-0","Namespace":"prod","ContainerName":"app","SessionType":"exec"},"srcNodeTags":["tag:ci"]}\n[0.1,"o","$ "]\n[0.2,"r","100x40"]\n[0.3,"i","ls\\r"]\n[1e-3,"o","\\u001b[31mred\\u001b[0m"]\n' >"$casts/k8s.cast"
printf '{"version":2,"width":80,"height":24,"srcNodeUserID":9007199254740993,"unknown":null}\n[0.5,"o","truncated' >"$casts/partial.cast"
printf '{"version":2,"width":80,"height":24}\n[-1,"o","x"]\n[NaN,"o","x"]\n["1","o",1]\n[1,"o"]\n\x00\xff\xfe\n[2,"x","?"]\n' >"$casts/malformed.cast"
python3 - "$casts/gen.cast" <<'PY'
import json, random, sys
random.seed(7)
lines = [json.dumps({"version": 2, "width": 120, "height": 40, "timestamp": 1700000000, "sshUser": "root"})]
t = 0.0
for i in range(400):
    t += random.random() / 5
    text = "".join(random.choice("abcdef \x1b[0m\r\n|/-") for _ in range(random.randint(1, 60)))
    lines.append(json.dumps([round(t, 6), random.choice("oooir"), text]))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
for f in "$casts"/*.cast; do cp "$f" "$out/cast_parse/$(basename "$f")"; done
printf '%s\n' '{"version":2}' '{"version":3}' '{"version":2,"width":"80"}' '[1]' '{"version":2,"width":80,"height":24,"timestamp":1.7e308}' >"$out/cast_parse/headers"

# A real node stores each recording; its chunks, manifests and seals seed the store readers.
data=$(mktemp -d -p "$casts")
"$bin" serve --data-dir "$data" --ingest-listen 127.0.0.1:0 --web-listen 127.0.0.1:0 >"$casts/addrs" 2>/dev/null &
node=$!
for _ in $(seq 100); do [[ -s $casts/addrs ]] && break; sleep 0.1; done
ingest=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["ingest"])' "$casts/addrs")
for f in "$casts"/*.cast; do
  curl -sf -H 'Expect: 100-continue' -H 'Transfer-Encoding: chunked' --data-binary @"$f" "http://$ingest/record" >/dev/null || true
done
sleep 2
kill "$node"; wait "$node" 2>/dev/null || true
n=0
while IFS= read -r manifest; do
  dir=$(dirname "$manifest")
  n=$((n + 1))
  { cat "$manifest"; printf '\0'; cat "$dir/manifest.sig.json"; } >"$out/manifest/stored-$n"
  for chunk in "$dir"/chunk-*.zst; do cp "$chunk" "$out/chunk_decode/stored-$n-$(basename "$chunk")"; done
done < <(find "$data/store" -name manifest.json | sort)
[[ $n -gt 0 ]] || { echo "no recording was stored" >&2; exit 1; }
printf '(\xb5/\xfd\x00\x00\x00' >"$out/chunk_decode/truncated-frame"
head -c 64 /dev/zero >"$out/chunk_decode/zeros"

# Raw HTTP/1.1 requests as real clients send them, and broken ones.
body=$(cat "$casts/ssh.cast")
len=$(printf '%s' "$body" | wc -c)
printf 'POST /record HTTP/1.1\r\nHost: 127.0.0.1:80\r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nAccept-Encoding: gzip\r\n\r\n%x\r\n%s\r\n0\r\n\r\n' "$len" "$body" >"$out/http1_ingest/v1-chunked"
printf 'POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s' "$len" "$body" >"$out/http1_ingest/v1-sized"
printf 'POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n' >"$out/http1_ingest/huge-chunk"
printf 'POST /v2/event HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n{"type":"request","x":null}' >"$out/http1_ingest/event"
printf 'HEAD /v2/record HTTP/1.1\r\nHost: x\r\n\r\nGET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n' >"$out/http1_ingest/pipelined"
printf 'POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5;ext=1\r\n{"ver\r\n0\r\nTrailer: x\r\n\r\n' >"$out/http1_ingest/smuggle"

# Configs: the deploy ConfigMap's and hand-written ones.
python3 - "$out/config" <<'PY'
import re, sys
out = sys.argv[1]
text = open("deploy/kubernetes/castvault.yaml").read()
m = re.search(r"castvault.toml: \|\n((?:    .*\n|\n)+)", text)
open(f"{out}/kubernetes.toml", "w").write("\n".join(l[4:] for l in m.group(1).splitlines()) + "\n")
open(f"{out}/full.toml", "w").write('''node_id = "n1"
region = "eu"
zone = "z1"
store = "memory://"
ack = "storage"
storage_outage = "fail"
max_open_recordings = 10
lease_ttl = "30s"
[chunk]
max_bytes = 1048576
max_age = "2s"
[regions.us]
store = "az://rec"
store_options = { account_name = "a", access_key = "secret", use_emulator = "true" }
failover = ["eu"]
[[routing]]
region = "us"
src_node_tags = ["tag:us*"]
[admission]
allow_cidrs = ["10.0.0.0/8", "::1"]
tokens = [{ name = "gw", sha256 = "00" }]
[limits]
max_connections_per_peer = 5
header_timeout = "1s"
[[retention]]
keep_days = 30
[access]
tokens = [{ name = "t", sha256 = "ab", role = "viewer" }]
''')
PY
echo "seeds: $(find "$out" -type f | wc -l) files"

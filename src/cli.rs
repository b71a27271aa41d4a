//! Offline commands that read a store directly: `recordings list`, `export`, `config check`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use castvault_storage::keys::RecordingId;
use castvault_storage::reader;
use castvault_storage::store::Stores;
use tokio::io::AsyncWriteExt;

use crate::config::Config;

/// Where an offline command finds the stores: `--store` (this region's) wins, then
/// `--data-dir`, then the config, which names every region's.
pub fn open_store(
    config: Option<&Path>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
) -> anyhow::Result<Stores> {
    load_config(config, data_dir, store)?
        .open_stores()
        .map_err(anyhow::Error::msg)
        .context("opening the stores")
}

/// The config an offline command runs with: `--store` and `--data-dir` override the file.
pub fn load_config(
    config: Option<&Path>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
) -> anyhow::Result<Config> {
    let mut cfg = Config::load(config)?;
    if let Some(dir) = data_dir {
        cfg.data_dir = dir;
        if store.is_none() {
            cfg.store = None;
        }
    }
    if let Some(url) = store {
        cfg.store = Some(url);
    }
    Ok(cfg)
}

/// The person running an offline command, with the key of the data directory (made if absent
/// and published to every store, so their audit records verify).
pub async fn actor(cfg: &Config, stores: &Stores) -> anyhow::Result<crate::retention::Actor> {
    use castvault_storage::store::{ErrorKind, error_kind, put_create};
    let key = castvault_storage::signing::NodeKey::load_or_create(&cfg.data_dir.join("keys"))
        .context("loading the signing key")?;
    let record = key.public_record(&cfg.node_id);
    let path = castvault_storage::keys::ObjectKey::public_key(&record.key_id);
    let bytes = bytes::Bytes::from(serde_json::to_vec_pretty(&record)?);
    for (region, entry) in stores.iter() {
        match put_create(entry.store.as_ref(), &path, bytes.clone()).await {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("publishing the signing key to region {region}")));
            }
        }
    }
    Ok(crate::retention::Actor {
        name: std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned()),
        key,
    })
}

/// `castvault retention run`: what expired (JSON lines), deleted unless `dry_run`.
pub async fn retention_run(
    cfg: &Config,
    dry_run: bool,
    as_of: Option<time::OffsetDateTime>,
) -> anyhow::Result<()> {
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let now = as_of.unwrap_or_else(time::OffsetDateTime::now_utc);
    let plan = crate::retention::plan(&stores, &cfg.retention, now).await?;
    let actor = actor(cfg, &stores).await?;
    let mut out = tokio::io::stdout();
    for expired in &plan {
        if !dry_run {
            crate::retention::delete(&stores, expired, &actor).await?;
        }
        let mut line = serde_json::to_vec(expired)?;
        line.push(b'\n');
        out.write_all(&line).await?;
    }
    out.flush().await?;
    eprintln!(
        "castvault: {} recordings {}",
        plan.len(),
        if dry_run {
            "would be deleted (dry run)"
        } else {
            "deleted"
        }
    );
    Ok(())
}

/// `castvault recordings list`.
pub async fn list(stores: Stores, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (region, entry) in stores.iter() {
        rows.extend(
            reader::list_catalog(entry.store.as_ref())
                .await
                .with_context(|| format!("listing region {region}"))?,
        );
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = tokio::io::stdout();
    if json {
        let mut text = serde_json::to_vec_pretty(&rows)?;
        text.push(b'\n');
        out.write_all(&text).await?;
    } else {
        let mut text = format!(
            "{:<48} {:<11} {:>12} {:<20} {:<24} {:<12}\n",
            "ID", "STATUS", "BYTES", "STARTED", "SRC NODE", "SSH USER"
        );
        for r in rows {
            let status = serde_json::to_value(r.status)?
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let started = r
                .started_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            text.push_str(&format!(
                "{:<48} {:<11} {:>12} {:<20} {:<24} {:<12}\n",
                r.id,
                status,
                r.bytes,
                started,
                r.src_node.as_deref().unwrap_or("-"),
                r.ssh_user.as_deref().unwrap_or("-")
            ));
        }
        out.write_all(text.as_bytes()).await?;
    }
    out.flush().await?;
    Ok(())
}

/// `castvault export ID --format cast`, audited.
pub async fn export_cast(cfg: &Config, id: &str, output: Option<&Path>) -> anyhow::Result<()> {
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let rid = RecordingId::parse(id)?;
    let signer = actor(cfg, &stores).await?;
    audit_export(&stores, &signer, &rid, "export").await?;
    export(stores, id, output).await
}

/// `castvault export ID --format cast`: the recording exactly as received, verified.
pub async fn export(stores: Stores, id: &str, output: Option<&Path>) -> anyhow::Result<()> {
    let id = RecordingId::parse(id)?;
    let store = stores.for_id(&id)?;
    let manifest = reader::read_manifest(store.as_ref(), &id).await?;
    match output {
        Some(path) => {
            // Write beside the target and rename, so a failed check leaves no partial file.
            let tmp = path.with_extension("partial");
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {}", tmp.display()))?;
            if let Err(e) = reader::write_body(store.as_ref(), &manifest, &mut file).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
            file.sync_all().await?;
            tokio::fs::rename(&tmp, path).await?;
        }
        None => reader::write_body(store.as_ref(), &manifest, &mut tokio::io::stdout()).await?,
    }
    Ok(())
}

/// `castvault verify ID`: prints every check; exit 1 on the first failure.
pub async fn verify(stores: &Stores, id: &str) -> anyhow::Result<std::process::ExitCode> {
    let id = RecordingId::parse(id)?;
    let store = stores.for_id(&id)?;
    let report = castvault_storage::verify::verify_stored(
        store.as_ref(),
        &id,
        castvault_storage::verify::KeyRing::default(),
    )
    .await;
    Ok(print_report(&format!("recording {id}"), &report))
}

/// `castvault export-query`: one archive of the bundles of every finalized recording `query`
/// matches, written beside `output` and renamed when whole.
pub async fn export_query(
    cfg: &Config,
    query: &crate::retention::HoldQuery,
    output: &Path,
) -> anyhow::Result<()> {
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let signer = actor(cfg, &stores).await?;
    let mut ids = Vec::new();
    for (region, entry) in stores.iter() {
        let rows = reader::list_catalog(entry.store.as_ref())
            .await
            .with_context(|| format!("listing region {region}"))?;
        ids.extend(
            rows.iter()
                .filter(|r| r.status != castvault_storage::manifest::RecordingStatus::Live)
                .filter(|r| query.matches(r))
                .filter_map(|r| RecordingId::parse(&r.id).ok()),
        );
    }
    ids.sort();
    let tmp = output.with_extension("partial");
    let mut file = tokio::io::BufWriter::new(
        tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?,
    );
    let exported_by = format!("{} (cli)", signer.name);
    let result = crate::export::write_many(
        &stores,
        &ids,
        &exported_by,
        |id| {
            let record = crate::audit::Record {
                time: time::OffsetDateTime::now_utc(),
                node: "cli".to_owned(),
                actor: signer.name.clone(),
                via: "cli".to_owned(),
                action: "export-bundle".to_owned(),
                recording_id: Some(id.to_string()),
                query: Some(serde_json::to_string(query).unwrap_or_default()),
                remote: "local".to_owned(),
            };
            let (store, key) = (stores.home_store().clone(), &signer.key);
            async move {
                crate::audit::write_one(&store, key, &record)
                    .await
                    .map_err(|e| crate::export::ExportError::Store(e.to_string()))
            }
        },
        &mut file,
    )
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e.into());
    }
    file.into_inner().sync_all().await?;
    tokio::fs::rename(&tmp, output).await?;
    eprintln!(
        "castvault: {} recordings exported to {}",
        ids.len(),
        output.display()
    );
    Ok(())
}

/// `castvault verify --audit`: the audit log of every region for the days `from..=to`.
pub async fn verify_audit(
    stores: &Stores,
    from: time::Date,
    to: time::Date,
) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(from <= to, "--from is after --to");
    anyhow::ensure!(
        (to - from).whole_days() < 3660,
        "at most ten years of audit log at once"
    );
    let mut days = Vec::new();
    let mut day = from;
    while day <= to {
        days.push(day.midnight().assume_utc());
        day = day.next_day().context("day out of range")?;
    }
    let mut code = std::process::ExitCode::SUCCESS;
    for (region, entry) in stores.iter() {
        let report = castvault_storage::auditlog::verify_days(entry.store.as_ref(), &days).await;
        if report.failure.is_some() {
            code = std::process::ExitCode::FAILURE;
        }
        print_report(
            &format!("audit log of region {region}, {from} to {to}"),
            &report,
        );
    }
    Ok(code)
}

/// `castvault verify --bundle FILE`.
pub fn verify_bundle(path: &Path) -> std::process::ExitCode {
    let report = castvault_storage::bundle::verify_bundle(path);
    print_report(&format!("bundle {}", path.display()), &report)
}

fn print_report(what: &str, report: &castvault_storage::verify::Report) -> std::process::ExitCode {
    let mut out = String::new();
    for line in &report.checked {
        out.push_str(&format!("ok: {line}\n"));
    }
    print!("{out}");
    match &report.failure {
        None => {
            println!(
                "verified: {what} ({})",
                report.status.as_deref().unwrap_or("unknown status")
            );
            std::process::ExitCode::SUCCESS
        }
        Some(failure) => {
            println!("FAILED: {what}: {failure}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The derived export formats.
#[derive(Debug, Clone, Copy)]
pub enum Derived {
    Transcript,
    Summary,
}

/// `castvault export ID --format transcript|summary` (audited like every export).
pub async fn export_derived(
    cfg: &Config,
    id: &str,
    what: Derived,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let id = RecordingId::parse(id)?;
    let store = stores.for_id(&id)?;
    let signer = actor(cfg, &stores).await?;
    let action = match what {
        Derived::Transcript => "export-transcript",
        Derived::Summary => "export-summary",
    };
    audit_export(&stores, &signer, &id, action).await?;
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match output {
        Some(path) => Box::new(tokio::io::BufWriter::new(
            tokio::fs::File::create(path)
                .await
                .with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(tokio::io::stdout()),
    };
    match what {
        Derived::Transcript => crate::export::write_transcript(store, &id, &mut out).await?,
        Derived::Summary => {
            let manifest = reader::read_manifest(store.as_ref(), &id).await?;
            let summary = crate::export::summary(&manifest, &format!("{} (cli)", signer.name));
            let mut text = serde_json::to_vec_pretty(&summary)?;
            text.push(b'\n');
            out.write_all(&text).await?;
        }
    }
    out.flush().await?;
    Ok(())
}

/// Writes the audit record of an offline export before anything is read.
async fn audit_export(
    stores: &Stores,
    signer: &crate::retention::Actor,
    id: &RecordingId,
    action: &str,
) -> anyhow::Result<()> {
    let record = crate::audit::Record {
        time: time::OffsetDateTime::now_utc(),
        node: "cli".to_owned(),
        actor: signer.name.clone(),
        via: "cli".to_owned(),
        action: action.to_owned(),
        recording_id: Some(id.to_string()),
        query: None,
        remote: "local".to_owned(),
    };
    crate::audit::write_one(stores.home_store(), &signer.key, &record)
        .await
        .context("writing the audit record of this export")
}

/// `castvault export ID --format bundle`: the compliance bundle, to a file (written beside it
/// and renamed when whole) or stdout. The export is written to the audit log first.
pub async fn export_bundle(cfg: &Config, id: &str, output: Option<&Path>) -> anyhow::Result<()> {
    let stores = &cfg.open_stores().map_err(anyhow::Error::msg)?;
    let id = RecordingId::parse(id)?;
    let store = stores.for_id(&id)?;
    let signer = actor(cfg, stores).await?;
    audit_export(stores, &signer, &id, "export-bundle").await?;
    let actor = signer.name.clone();
    let custody = crate::export::custody(stores, &id).await?;
    let bundle =
        crate::export::Bundle::gather(store, &id, &custody, &format!("{actor} (cli)")).await?;
    match output {
        Some(path) => {
            let tmp = path.with_extension("partial");
            let mut file = tokio::io::BufWriter::new(
                tokio::fs::File::create(&tmp)
                    .await
                    .with_context(|| format!("creating {}", tmp.display()))?,
            );
            if let Err(e) = bundle.write(store, &mut file).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
            file.into_inner().sync_all().await?;
            tokio::fs::rename(&tmp, path).await?;
        }
        None => bundle.write(store, &mut tokio::io::stdout()).await?,
    }
    Ok(())
}

/// `castvault config check`: prints every problem; the caller exits non-zero if any.
pub fn check(config: Option<&Path>) -> Vec<String> {
    match Config::load(config) {
        Ok(cfg) => cfg.validate(),
        Err(e) => vec![crate::upload::error_chain(&e)],
    }
}

//! The web UI: server-rendered pages (the recordings list with filters and full-text search,
//! a player page, a live page) whose only script is the player: asciinema-player, vendored
//! from npm (ui/package-lock.json pins it; ui/vendor holds its bundle), plus a small glue
//! script that loads windows of the recording into it. Every page works with scripts off
//! except the player itself.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use castvault_storage::manifest::CatalogRow;
use futures::StreamExt as _;
use time::format_description::well_known::Rfc3339;

use crate::catalog::{Hit, Order, Query, SortKey};
use crate::playback::{ApiError, Caller, Web};

const PLAYER_JS: &[u8] = include_bytes!("../ui/vendor/asciinema-player.min.js");
const PLAYER_CSS: &[u8] = include_bytes!("../ui/vendor/asciinema-player.css");
const GLUE_JS: &str = include_str!("../ui/castvault.js");
const STYLE_CSS: &str = include_str!("../ui/castvault.css");

/// The player's assets. The head preloads the player and runs our small script when the page is
/// parsed; that script starts the player only after the page has painted, so the screen a player
/// page draws shows before the player's work begins. A player page sends its head before it
/// draws the screen, so the browser fetches the player meanwhile. The stylesheet is linked at the
/// end of the body, so the page paints without waiting for it.
const PLAYER_ASSETS: Assets = Assets {
    head: "<link rel=\"preload\" href=\"/assets/asciinema-player.min.js\" as=\"script\">\
           <script src=\"/assets/castvault.js\" defer></script>",
    body_end: "<link rel=\"stylesheet\" href=\"/assets/asciinema-player.css\">",
};

/// No assets beyond the page's own inline style.
const NO_ASSETS: Assets = Assets {
    head: "",
    body_end: "",
};

/// What a page links besides its inline style, and where.
#[derive(Clone, Copy)]
struct Assets {
    head: &'static str,
    body_end: &'static str,
}

/// Search hits listed on a player page.
const PLAYER_PAGE_HITS: usize = 50;

pub fn routes() -> Router<Arc<Web>> {
    Router::new()
        .route("/", get(list_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/play/{id}", get(play_page))
        .route(
            "/assets/asciinema-player.min.js",
            get(|| asset(PLAYER_JS, "text/javascript")),
        )
        .route(
            "/assets/asciinema-player.css",
            get(|| asset(PLAYER_CSS, "text/css")),
        )
        .route(
            "/assets/castvault.js",
            get(|| asset(GLUE_JS.as_bytes(), "text/javascript")),
        )
}

async fn asset(bytes: &'static [u8], content_type: &'static str) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

/// HTML-escapes text for element content and quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A search hit's text with the matched words (between \u{1} and \u{2}) in `<mark>`.
fn highlighted(text: &str) -> String {
    esc(text)
        .replace('\u{1}', "<mark>")
        .replace('\u{2}', "</mark>")
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn page(title: &str, body: &str) -> Html<String> {
    page_as(None, title, body, NO_ASSETS)
}

/// A page; `who` (the signed-in caller) gets their name and a sign-out button in the header.
fn page_as(who: Option<&Caller>, title: &str, body: &str, assets: Assets) -> Html<String> {
    let mut page = page_head(title, assets);
    page.push_str(&body_start(who));
    page.push_str(body);
    page.push_str(&page_end(assets));
    Html(page)
}

/// A page up to the end of its `<head>`.
fn page_head(title: &str, assets: Assets) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · castvault</title><style>{STYLE_CSS}</style>{}</head>",
        esc(title),
        assets.head
    )
}

/// A page's body up to and including the opening of its `<main>`; `who` (the signed-in caller)
/// gets their name and a sign-out button in the header.
fn body_start(who: Option<&Caller>) -> String {
    let account = who.map_or_else(String::new, |c| {
        format!(
            "<form method=\"post\" action=\"/logout\" class=\"logout\"><span class=\"who\">{}</span> <button type=\"submit\">Sign out</button></form>",
            esc(&c.identity.name)
        )
    });
    format!("<body><header><a href=\"/\" class=\"brand\">castvault</a>{account}</header><main>")
}

/// A page from the end of its `<main>`.
fn page_end(assets: Assets) -> String {
    format!("</main>{}</body></html>", assets.body_end)
}

fn error_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        page(
            "Error",
            &format!("<h1>{}</h1><p>{}</p>", status, esc(message)),
        ),
    )
        .into_response()
}

impl ApiError {
    fn into_page(self) -> Response {
        let status = self.status();
        error_page(status, &crate::upload::error_chain(&self))
    }
}

fn field(name: &str, label: &str, value: Option<&str>, placeholder: &str) -> String {
    format!(
        "<label>{label}<input name=\"{name}\" value=\"{}\" placeholder=\"{}\"></label>",
        esc(value.unwrap_or("")),
        esc(placeholder)
    )
}

fn opt_num<T: ToString>(v: Option<T>) -> Option<String> {
    v.map(|v| v.to_string())
}

fn filter_form(q: &Query) -> String {
    let fmt_time = |t: Option<time::OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let mut out = String::from("<form method=\"get\" action=\"/\" class=\"filters\">");
    out.push_str(&format!(
        "<label class=\"search\">Search what the screen showed<input name=\"q\" type=\"search\" value=\"{}\" placeholder=\"systemctl restart\" autofocus></label>",
        esc(q.q.as_deref().unwrap_or(""))
    ));
    let from = fmt_time(q.from);
    let to = fmt_time(q.to);
    let text_fields = [
        (
            "from",
            "Started from",
            from.as_deref(),
            "2026-11-24T00:00:00Z",
        ),
        (
            "to",
            "Started before",
            to.as_deref(),
            "2026-11-25T00:00:00Z",
        ),
        (
            "srcNode",
            "Node",
            q.src_node.as_deref(),
            "laptop.tail-net.ts.net",
        ),
        (
            "srcNodeTags",
            "Node tags",
            q.src_node_tags.as_deref(),
            "tag:prod,tag:db",
        ),
        (
            "srcNodeUser",
            "Tailscale user",
            q.src_node_user.as_deref(),
            "alice@example.com",
        ),
        ("sshUser", "SSH user", q.ssh_user.as_deref(), "alice"),
        ("localUser", "Local user", q.local_user.as_deref(), "root"),
        ("connectionID", "Connection", q.connection_id.as_deref(), ""),
        ("region", "Region", q.region.as_deref(), ""),
    ];
    for (name, label, value, placeholder) in text_fields {
        out.push_str(&field(name, label, value, placeholder));
    }
    let status = q
        .status
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    out.push_str("<label>Status<select name=\"status\"><option value=\"\">any</option>");
    for s in ["live", "complete", "interrupted", "recovered", "imported"] {
        let sel = if status.as_deref() == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, "<option{sel}>{s}</option>");
    }
    out.push_str("</select></label>");
    let numbers = [
        ("minDuration", "Min seconds", opt_num(q.min_duration)),
        ("maxDuration", "Max seconds", opt_num(q.max_duration)),
        ("minBytes", "Min bytes", opt_num(q.min_bytes)),
        ("maxBytes", "Max bytes", opt_num(q.max_bytes)),
    ];
    for (name, label, value) in numbers {
        out.push_str(&field(name, label, value.as_deref(), ""));
    }
    out.push_str("<label>Sort<select name=\"sort\">");
    for (key, name) in [
        (SortKey::Started, "started"),
        (SortKey::Duration, "duration"),
        (SortKey::Bytes, "bytes"),
    ] {
        let sel = if q.sort == key { " selected" } else { "" };
        let _ = write!(out, "<option{sel}>{name}</option>");
    }
    out.push_str("</select></label><label>Order<select name=\"order\">");
    for (key, name) in [(Order::Desc, "desc"), (Order::Asc, "asc")] {
        let sel = if q.order == key { " selected" } else { "" };
        let _ = write!(out, "<option{sel}>{name}</option>");
    }
    out.push_str(
        "</select></label><button type=\"submit\">Filter</button> <a href=\"/\">Clear</a></form>",
    );
    out
}

fn started(row: &CatalogRow) -> String {
    let t = row.started_at;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn status_name(row: &CatalogRow) -> String {
    serde_json::to_value(row.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn hit_links(id: &str, q: &str, hits: &[Hit]) -> String {
    let mut out = String::from("<ul class=\"hits\">");
    for hit in hits {
        let _ = write!(
            out,
            "<li><a class=\"hit\" href=\"/play/{}?t={:.3}&amp;q={}\"><span class=\"time\">{}</span> <code>{}</code></a></li>",
            esc(id),
            hit.time,
            esc(&urlencode(q)),
            clock(hit.time),
            highlighted(&hit.text)
        );
    }
    out.push_str("</ul>");
    out
}

/// A number as JavaScript's `String(n)` writes it (for the URLs the player script builds).
fn js_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|e| e.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

/// Sends the browser to the login page, to come back to `target` (a path on this site).
pub fn to_login(target: &str) -> Response {
    let location = format!("/login?next={}", urlencode(target));
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Only same-site paths are followed after login.
fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or("/")
}

#[derive(serde::Deserialize, Default)]
struct LoginForm {
    #[serde(default)]
    token: String,
    next: Option<String>,
}

fn login_form(next: &str, error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "Sign in",
        &format!(
            "<h1>Sign in</h1>{error}<form method=\"post\" action=\"/login\" class=\"login\">\
             <label>Access token<input name=\"token\" type=\"password\" autocomplete=\"current-password\" autofocus></label>\
             <input type=\"hidden\" name=\"next\" value=\"{}\"><button type=\"submit\">Sign in</button></form>\
             <p>Behind <code>tailscale serve</code> or with tailscaled's WhoIs configured, you are signed in without a token.</p>",
            esc(next)
        ),
    )
}

async fn login_page(RawQuery(raw): RawQuery) -> Response {
    let form: LoginForm =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or("")).unwrap_or_default();
    login_form(safe_next(form.next.as_deref()), None).into_response()
}

/// Checks the token and keeps it in an HttpOnly, same-site cookie.
async fn login(State(web): State<Arc<Web>>, body: axum::body::Bytes) -> Response {
    let form: LoginForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let next = safe_next(form.next.as_deref()).to_owned();
    let token = form.token.trim();
    if !web.access.check_token(token) {
        return (
            StatusCode::UNAUTHORIZED,
            login_form(&next, Some("That token is not valid.")),
        )
            .into_response();
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    let cookie = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict",
        crate::auth::TOKEN_COOKIE
    );
    if let (Ok(cookie), Ok(location)) =
        (HeaderValue::from_str(&cookie), HeaderValue::from_str(&next))
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

async fn logout() -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        crate::auth::TOKEN_COOKIE
    );
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/login"));
    response
}

async fn list_page(
    State(web): State<Arc<Web>>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    let query = match Query::parse(&raw) {
        Ok(q) => q,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let q_text = query.q.clone().unwrap_or_default();
    if query.q.is_some()
        && let Err(e) = web.audit(&caller, "search", None, Some(raw.clone())).await
    {
        return e.into_page();
    }
    let result = web
        .catalog
        .list(query.clone(), caller.identity.scope.clone())
        .await;
    let page_data = match result {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_page(),
    };
    let mut body = String::from("<h1>Recordings</h1>");
    body.push_str(&filter_form(&query));
    if page_data.recordings.is_empty() {
        body.push_str("<p class=\"empty\">No recordings match.</p>");
    } else {
        body.push_str(
            "<table class=\"recordings\"><thead><tr><th>Started</th><th>Duration</th><th>Status</th>\
             <th>Node</th><th>Tailscale user</th><th>SSH user</th><th>Local user</th><th>Size</th><th>Region</th></tr></thead><tbody>",
        );
        for listed in &page_data.recordings {
            let row = &listed.row;
            let id = esc(&row.id);
            let status = status_name(row);
            let _ = write!(
                body,
                "<tr class=\"recording\" data-id=\"{id}\"><td><a href=\"/play/{id}\">{}</a></td><td>{}</td><td class=\"status {status}\">{status}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                started(row),
                clock(row.duration_seconds),
                esc(row.src_node.as_deref().unwrap_or("")),
                esc(row.src_node_user.as_deref().unwrap_or("")),
                esc(row.ssh_user.as_deref().unwrap_or("")),
                esc(row.local_user.as_deref().unwrap_or("")),
                row.bytes,
                esc(&row.region),
            );
            if !listed.hits.is_empty() {
                let _ = write!(
                    body,
                    "<tr class=\"hits-row\"><td colspan=\"9\">{}</td></tr>",
                    hit_links(&row.id, &q_text, &listed.hits)
                );
            }
        }
        body.push_str("</tbody></table>");
    }
    if let Some(next) = &page_data.next {
        let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).unwrap_or_default();
        pairs.retain(|(k, _)| k != "cursor");
        pairs.push(("cursor".into(), next.clone()));
        let href = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        let _ = write!(
            body,
            "<p><a class=\"next\" href=\"/?{}\">Next page</a></p>",
            esc(&href)
        );
    }
    page_as(Some(&caller), "Recordings", &body, NO_ASSETS).into_response()
}

#[derive(serde::Deserialize, Default)]
struct PlayQuery {
    t: Option<f64>,
    q: Option<String>,
}

async fn play_page(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query: PlayQuery = match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Ok(rid) = castvault_storage::keys::RecordingId::parse(&id) else {
        return error_page(StatusCode::BAD_REQUEST, "invalid recording id");
    };
    let row = match web.visible(&caller, &rid).await {
        Ok(row) => row,
        Err(e) => return e.into_page(),
    };
    if let Err(e) = web.audit(&caller, "view", Some(&rid), None).await {
        return e.into_page();
    }
    // Parsed once here and cached, so the player's first window request reads only chunks.
    let seekable = web.seekable(&rid).await.ok();
    let manifest = seekable.as_ref().map(|s| &s.manifest);
    let header = manifest
        .as_ref()
        .map(|m| m.header.clone())
        .unwrap_or_default();
    let k8s = |k: &str| {
        header
            .get("kubernetes")
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let mut facts = vec![
        ("Started", started(&row)),
        ("Duration", clock(row.duration_seconds)),
        ("Status", status_name(&row)),
        ("Node", row.src_node.clone().unwrap_or_default()),
        ("Node tags", row.src_node_tags.join(", ")),
        (
            "Tailscale user",
            row.src_node_user.clone().unwrap_or_default(),
        ),
        ("SSH user", row.ssh_user.clone().unwrap_or_default()),
        ("Local user", row.local_user.clone().unwrap_or_default()),
        ("Command", row.command.clone().unwrap_or_default()),
        ("Connection", row.connection_id.clone().unwrap_or_default()),
        ("Region", row.region.clone()),
        ("Recorded by", row.node_id.clone()),
        ("Size", format!("{} bytes", row.bytes)),
    ];
    if let Some(pod) = k8s("PodName") {
        facts.push((
            "Kubernetes pod",
            format!(
                "{}/{} ({})",
                k8s("Namespace").unwrap_or_default(),
                pod,
                k8s("Container").unwrap_or_default()
            ),
        ));
    }
    let mut body = format!("<h1>Session {}</h1><dl class=\"facts\">", esc(&id));
    for (k, v) in facts.iter().filter(|(_, v)| !v.is_empty()) {
        let _ = write!(body, "<dt>{k}</dt><dd>{}</dd>", esc(v));
    }
    body.push_str("</dl>");
    if manifest.is_none() {
        if web.uploader.live(&rid).is_none() {
            let _ = write!(
                body,
                "<p class=\"notice\">This recording is still being received, by node {}: its live view is on that node. It can be played here once it ends.</p>",
                esc(&row.node_id)
            );
            return page_as(Some(&caller), "Session", &body, NO_ASSETS).into_response();
        }
        let _ = write!(
            body,
            "<p class=\"notice live\">Live: this session is in progress.</p>\
             <div id=\"live\" data-url=\"/api/v1/recordings/{}/live\"></div>\
             <p id=\"live-ended\" hidden>The session has ended. <a href=\"/play/{}\">Play the recording</a> once it is stored.</p>",
            esc(&id),
            esc(&id)
        );
        return page_as(Some(&caller), "Live session", &body, PLAYER_ASSETS).into_response();
    }
    // The head (which preloads the player) goes out at once, so the browser fetches the player
    // while the first window is built; the body follows whole, so the page's first paint holds
    // the drawn screen.
    let head = page_head("Session", PLAYER_ASSETS);
    let body = body_start(Some(&caller)) + &body;
    let rest = async move {
        let mut rest = body;
        // The first window comes with the page: its screen drawn as HTML (it shows at once,
        // before and without the player script), its events for the player to start on.
        let start = (query.t.unwrap_or(0.0).max(0.0) * 1000.0).round() / 1000.0;
        let first_window = match &seekable {
            Some(s) if s.index.is_some() => match web.store(&rid) {
                Ok(store) => {
                    crate::playback::build_window(store, &rid, &s.manifest, s.index.as_ref(), start)
                        .await
                        .ok()
                }
                Err(_) => None,
            },
            _ => None,
        };
        let first_screen = first_window
            .as_ref()
            .map(|w| screen_html(&w.screen))
            .unwrap_or_default();
        let _ = write!(
            rest,
            "<div class=\"controls\">\
             <label>Speed <select id=\"speed\">{}</select></label> \
             <label>Idle limit <select id=\"idle\"><option value=\"\">off</option><option>1</option><option selected>2</option><option>5</option></select></label> \
             <input id=\"seek\" type=\"range\" min=\"0\" max=\"{dur:.3}\" step=\"0.1\" value=\"{t:.3}\" aria-label=\"Seek\"> \
             <span id=\"pos\">{}</span> / {}</div>\
             <div id=\"player\" data-id=\"{}\" data-duration=\"{dur:.3}\" data-start=\"{t:.3}\" data-paused=\"{paused}\">{screen}</div>\
             <p class=\"keys\">Keys: space play/pause · ←/→ step · &lt; &gt; speed · 0–9 jump · f full screen</p>\
             <p><a href=\"/api/v1/recordings/{}/cast\" download>Download .cast</a> · \
             <a id=\"bundle\" href=\"/api/v1/recordings/{}/bundle\" download>Download compliance bundle</a></p>",
            [0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0]
                .iter()
                .map(|s| format!(
                    "<option{}>{s}</option>",
                    if (*s - 1.0f64).abs() < 1e-9 {
                        " selected"
                    } else {
                        ""
                    }
                ))
                .collect::<String>(),
            clock(query.t.unwrap_or(0.0)),
            clock(row.duration_seconds),
            esc(&id),
            esc(&id),
            esc(&id),
            dur = row.duration_seconds,
            t = query.t.unwrap_or(0.0).max(0.0),
            paused = query.t.is_some(),
            screen = first_screen,
        );
        if let Some(q) = query.q.as_deref().filter(|q| !q.trim().is_empty()) {
            match web.catalog.hits(id.clone(), q, PLAYER_PAGE_HITS).await {
                Ok(hits) => {
                    let _ = write!(
                        rest,
                        "<h2>Matches for “{}”</h2>{}",
                        esc(q),
                        hit_links(&id, q, &hits)
                    );
                }
                Err(e) => tracing::warn!(error = %e, "search hits failed"),
            }
        }
        if let Some(w) = &first_window {
            let text = serde_json::to_string(&String::from_utf8_lossy(&w.body))
                .unwrap_or_default()
                .replace('<', "\\u003c");
            let _ = write!(
                rest,
                "<script type=\"application/json\" id=\"first-window\" data-from=\"{}\" data-start=\"{}\" data-next=\"{}\">{text}</script>",
                js_number(start),
                w.start,
                w.next.map(|n| n.to_string()).unwrap_or_default()
            );
        }
        rest.push_str(&page_end(PLAYER_ASSETS));
        rest
    };
    let parts = futures::stream::once(std::future::ready(head))
        .chain(futures::stream::once(rest))
        .map(|part| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(part)));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        axum::body::Body::from_stream(parts),
    )
        .into_response()
}

/// The 16 base colours (xterm's defaults), then the 6×6×6 cube and the grey ramp.
fn indexed_rgb(i: u8) -> (u8, u8, u8) {
    const BASE: [(u8, u8, u8); 16] = [
        (0, 0, 0),
        (205, 0, 0),
        (0, 205, 0),
        (205, 205, 0),
        (0, 0, 238),
        (205, 0, 205),
        (0, 205, 205),
        (229, 229, 229),
        (127, 127, 127),
        (255, 0, 0),
        (0, 255, 0),
        (255, 255, 0),
        (92, 92, 255),
        (255, 0, 255),
        (0, 255, 255),
        (255, 255, 255),
    ];
    match i {
        0..=15 => BASE[usize::from(i)],
        16..=231 => {
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            let n = i - 16;
            (level(n / 36), level(n / 6 % 6), level(n % 6))
        }
        _ => {
            let g = 8 + (i - 232) * 10;
            (g, g, g)
        }
    }
}

fn css_color(color: avt::Color) -> String {
    let (r, g, b) = match color {
        avt::Color::Indexed(i) => indexed_rgb(i),
        avt::Color::RGB(c) => (c.r, c.g, c.b),
    };
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// A terminal screen as HTML: one `<span>` per run of cells drawn with the same pen. Shown
/// at once when a player page opens, before (and without) any script.
pub fn screen_html(snapshot: &crate::indexer::Snapshot) -> String {
    let Ok(replay) = crate::indexer::Replay::resume(snapshot) else {
        return String::new();
    };
    let mut out = String::from("<pre class=\"screen\">");
    for line in replay.terminal().screen().visible_lines() {
        for cells in line.chunks(|a, b| a.pen() != b.pen()) {
            let Some(first) = cells.first() else { continue };
            let pen = first.pen();
            let (mut fg, mut bg) = (pen.foreground(), pen.background());
            if pen.is_inverse() {
                std::mem::swap(&mut fg, &mut bg);
            }
            let mut style = String::new();
            if let Some(fg) = fg {
                let _ = write!(style, "color:{};", css_color(fg));
            }
            if let Some(bg) = bg {
                let _ = write!(style, "background:{};", css_color(bg));
            }
            if pen.is_bold() {
                style.push_str("font-weight:bold;");
            }
            if pen.is_underline() {
                style.push_str("text-decoration:underline;");
            }
            let text: String = cells.iter().map(avt::Cell::char).collect();
            if style.is_empty() {
                out.push_str(&esc(&text));
            } else {
                let _ = write!(out, "<span style=\"{style}\">{}</span>", esc(&text));
            }
        }
        out.push('\n');
    }
    out.push_str("</pre>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_highlights() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(
            highlighted("a \u{1}<b>\u{2} c"),
            "a <mark>&lt;b&gt;</mark> c"
        );
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(clock(65.9), "1:05");
        assert_eq!(urlencode("a b&c"), "a+b%26c");
    }
}

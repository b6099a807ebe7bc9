//! The portal's pages. Each handler builds a [`PortalCtx`] (signed in, acting for the tenant
//! in the URL), reads or writes through the API's own functions, and renders a template.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use serde::Deserialize;
use uuid::Uuid;

use super::chart::{self, Marker, Series};
use super::{
    csrf_token, expired, html, see_other, session_cookie, signed_in, Layout, PortalCtx,
    PortalError, ASSET_VERSION, LOGIN_COOKIE, SESSION_COOKIE,
};
use crate::api::paths::PathView;
use crate::db::schema::{audit_log, endpoints, flows, policies, site_intents, sites};

type PageResult = Result<HttpResponse, PortalError>;

fn id_in(req: &HttpRequest) -> Result<Uuid, PortalError> {
    req.match_info()
        .get("id")
        .and_then(|id| id.parse().ok())
        .ok_or(PortalError::NotFound)
}

fn ago(at: Option<DateTime<Utc>>) -> String {
    let Some(at) = at else {
        return "never".into();
    };
    let seconds = (Utc::now() - at).num_seconds().max(0);
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => at.format("%Y-%m-%d %H:%M").to_string(),
    }
}

fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

// ---- sign-in ---------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    asset_version: &'static str,
    csrf: String,
    email: String,
    error: Option<String>,
}

fn login_page(
    status: StatusCode,
    secret: &str,
    email: String,
    error: Option<String>,
) -> HttpResponse {
    let page = LoginPage {
        asset_version: ASSET_VERSION.as_str(),
        csrf: csrf_token(secret),
        email,
        error,
    };
    html(status, page.render())
}

/// `GET /portal/login`: the form, with a fresh random value in a cookie for its CSRF token.
pub async fn login_form(req: HttpRequest) -> PageResult {
    if signed_in(&req).await.is_ok() {
        return Ok(see_other("/portal/"));
    }
    let (secret, _) = crate::auth::new_secret("login_");
    let mut response = login_page(StatusCode::OK, &secret, String::new(), None);
    let cookie = actix_web::cookie::Cookie::build(LOGIN_COOKIE, secret)
        .path("/portal/login")
        .http_only(true)
        .secure(true)
        .same_site(actix_web::cookie::SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::minutes(30))
        .finish();
    response
        .add_cookie(&cookie)
        .map_err(|e| PortalError::Internal(e.to_string()))?;
    Ok(response)
}

#[derive(Deserialize)]
pub struct LoginForm {
    csrf: String,
    email: String,
    password: String,
}

/// `POST /portal/login`: the API's password check (same rate limits, same audit entry), then
/// the session token goes into the session cookie.
pub async fn login(req: HttpRequest, form: web::Form<LoginForm>) -> PageResult {
    let LoginForm {
        csrf,
        email,
        password,
    } = form.into_inner();
    let Some(secret) = req.cookie(LOGIN_COOKIE).map(|c| c.value().to_owned()) else {
        return Ok(see_other("/portal/login"));
    };
    if !super::same(&csrf, &csrf_token(&secret)) {
        return Ok(login_page(
            StatusCode::FORBIDDEN,
            &secret,
            email,
            Some("The sign-in form expired; try again.".into()),
        ));
    }
    let state = req
        .app_data::<web::Data<crate::server::AppState>>()
        .cloned()
        .ok_or_else(|| PortalError::Internal("application state missing".into()))?;
    match crate::api::session::password_login(&state, &req, email.clone(), password).await {
        Ok(pair) => {
            let mut response = see_other("/portal/");
            response
                .add_cookie(&session_cookie(&pair.session_token, pair.expires_in))
                .and_then(|()| response.add_cookie(&expired(LOGIN_COOKIE, "/portal/login")))
                .map_err(|e| PortalError::Internal(e.to_string()))?;
            Ok(response)
        }
        Err(e) => Ok(login_page(e.status, &secret, email, Some(e.detail))),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

/// `POST /portal/logout`: the session is revoked (not only forgotten by the browser).
pub async fn logout(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let (ctx, token) = signed_in(&req).await?;
    if !super::same(&form.csrf, &csrf_token(&token)) {
        return Err(PortalError::Forbidden(
            "the form was stale; reload the page and try again".into(),
        ));
    }
    crate::api::session::revoke_session(&ctx.state, &token).await?;
    let mut response = see_other("/portal/login");
    response
        .add_cookie(&expired(SESSION_COOKIE, "/"))
        .map_err(|e| PortalError::Internal(e.to_string()))?;
    Ok(response)
}

/// `GET /portal/`: to the operator's tenant (an MSP admin: its first tenant).
pub async fn home(req: HttpRequest) -> PageResult {
    let (ctx, _) = signed_in(&req).await?;
    if let Some(tenant) = ctx.principal.tenant {
        return Ok(see_other(&format!("/portal/t/{}/", tenant.0)));
    }
    let msp = ctx.principal.msp;
    let first: Option<Uuid> = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                Ok(crate::db::schema::tenants::table
                    .filter(crate::db::schema::tenants::msp_id.eq(msp))
                    .order(crate::db::schema::tenants::name)
                    .select(crate::db::schema::tenants::id)
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?;
    match first {
        Some(tenant) => Ok(see_other(&format!("/portal/t/{tenant}/"))),
        None => Err(PortalError::BadRequest(
            "this MSP has no tenants yet: create one with POST /api/v1/tenants".into(),
        )),
    }
}

#[derive(Deserialize)]
pub struct SwitchQuery {
    tenant: Uuid,
}

/// `GET /portal/switch?tenant=`: the tenant picker (the tenant page itself checks access).
pub async fn switch_tenant(query: web::Query<SwitchQuery>) -> HttpResponse {
    see_other(&format!("/portal/t/{}/", query.tenant))
}

// ---- events ----------------------------------------------------------------------------------

/// An event as the portal lists it.
pub struct EventLine {
    pub at: String,
    pub kind: String,
    pub site: String,
    pub summary: String,
}

/// The event's kind (its wire tag) and a one-line description (pure).
pub fn describe(event: &SdwanEvent, site_names: &HashMap<Uuid, String>) -> (String, String) {
    let name = |id: &Uuid| {
        site_names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    let kind = serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let summary = match event {
        SdwanEvent::SiteJoined { site_name, .. } => format!("site {site_name} joined"),
        SdwanEvent::SiteLeft { site } => format!("site {} left", name(&site.0)),
        SdwanEvent::SiteStatusChanged { site, status } => {
            format!("site {} is now {status:?}", name(&site.0)).to_lowercase()
        }
        SdwanEvent::PathEstablished { path, dst, .. } => {
            format!("path {} to {} is up", short(&path.0), name(&dst.0))
        }
        SdwanEvent::PathFailed { path, reason } => {
            format!("path {} failed: {reason}", short(&path.0))
        }
        SdwanEvent::PathDegraded { path, metrics } => format!(
            "path {} degraded: {:.1} ms, {:.1} ms jitter, {:.1} % loss",
            short(&path.0),
            metrics.latency_ms,
            metrics.jitter_ms,
            metrics.packet_loss_pct
        ),
        SdwanEvent::FailoverTriggered {
            from_path,
            to_path,
            reason,
        } => format!(
            "failover from path {} to {}: {reason}",
            short(&from_path.0),
            short(&to_path.0)
        ),
        SdwanEvent::PolicyApplied { policy, path, .. } => {
            format!(
                "policy {} applied on path {}",
                short(&policy.0),
                short(&path.0)
            )
        }
        SdwanEvent::PathMetrics { path, .. } => format!("metrics of path {}", short(&path.0)),
        SdwanEvent::TopologyChanged { .. } => "topology changed".into(),
        SdwanEvent::IntentApplied { revision } => format!("applied intent revision {revision}"),
        SdwanEvent::IntentRejected { revision, reason } => {
            format!("rejected intent revision {revision}: {reason}")
        }
        SdwanEvent::Heartbeat { .. } => "heartbeat".into(),
        SdwanEvent::Unknown => "an event this controller does not know".into(),
    };
    (kind, summary)
}

fn short(id: &Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

fn event_lines(events: &[EventEnvelope], names: &HashMap<Uuid, String>) -> Vec<EventLine> {
    events
        .iter()
        .map(|e| {
            let (kind, summary) = describe(&e.event, names);
            let at = DateTime::<Utc>::from_timestamp_millis(e.at_unix_ms as i64)
                .map(when)
                .unwrap_or_default();
            EventLine {
                at,
                kind,
                site: e
                    .site
                    .map(|s| names.get(&s.0).cloned().unwrap_or_else(|| short(&s.0)))
                    .unwrap_or_default(),
                summary,
            }
        })
        .collect()
}

async fn recent_events(p: &PortalCtx, limit: usize) -> Vec<EventEnvelope> {
    match crate::events::recent(&p.ctx.state, p.tenant, limit).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(tenant = %p.tenant, error = %e, "recent events unavailable");
            Vec::new()
        }
    }
}

async fn site_names(p: &PortalCtx) -> Result<HashMap<Uuid, String>, PortalError> {
    Ok(p.ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                Ok(sites::table
                    .select((sites::id, sites::name))
                    .load::<(Uuid, String)>(conn)
                    .await?)
            })
        })
        .await?
        .into_iter()
        .collect())
}

// ---- overview --------------------------------------------------------------------------------

pub struct SiteLine {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub region: String,
    pub uplinks: String,
    pub worst_status: String,
    pub worst_path: Option<Uuid>,
    pub worst_label: String,
    pub last_seen: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    layout: Layout,
    sites: Vec<SiteLine>,
    up: usize,
    degraded: usize,
    down: usize,
    events: Vec<EventLine>,
}

/// How bad a path status is, for "worst path" (higher is worse).
fn badness(status: &str) -> u8 {
    match status {
        "down" => 3,
        "degraded" => 2,
        "unknown" => 1,
        _ => 0,
    }
}

/// `GET /portal/t/{tenant}/`: every site with its state, uplinks and worst path; path counts;
/// recent events. Live.
pub async fn overview(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let (rows, uplinks) = p
        .ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                let rows: Vec<crate::api::sites::SiteRow> = sites::table
                    .select(crate::api::sites::SiteRow::as_select())
                    .order(sites::name)
                    .load(conn)
                    .await?;
                let uplinks: Vec<(Uuid, String, String)> = endpoints::table
                    .order((endpoints::site_id, endpoints::uplink_index))
                    .select((
                        endpoints::site_id,
                        endpoints::name,
                        endpoints::interface_type,
                    ))
                    .load(conn)
                    .await?;
                Ok((rows, uplinks))
            })
        })
        .await?;
    let paths = crate::api::paths::all_views(&p.ctx, None).await?;
    let count = |status: &str| paths.iter().filter(|x| x.status == status).count();
    let names: HashMap<Uuid, String> = rows.iter().map(|s| (s.id, s.name.clone())).collect();
    // Each site's worst outgoing path and its uplinks, in one pass over each list.
    let rank = |x: &PathView| {
        (
            badness(&x.status),
            std::cmp::Reverse(x.score.unwrap_or(100)),
        )
    };
    let mut worst_of: HashMap<Uuid, &PathView> = HashMap::new();
    for path in &paths {
        let worst = worst_of.entry(path.src_site_id).or_insert(path);
        if rank(path) > rank(worst) {
            *worst = path;
        }
    }
    let mut uplinks_of: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (site, name, kind) in &uplinks {
        uplinks_of
            .entry(*site)
            .or_default()
            .push(format!("{name} ({kind})"));
    }
    let sites = rows
        .iter()
        .map(|site| {
            let worst = worst_of.get(&site.id).copied();
            SiteLine {
                id: site.id,
                name: site.name.clone(),
                status: site.status.clone(),
                region: site.region.clone().unwrap_or_default(),
                uplinks: uplinks_of
                    .get(&site.id)
                    .map(|u| u.join(", "))
                    .unwrap_or_default(),
                worst_status: worst.map_or("unknown".into(), |w| w.status.clone()),
                worst_path: worst.map(|w| w.id),
                worst_label: worst.map_or("no paths".into(), |w| {
                    format!(
                        "{} → {} {} ({})",
                        w.src_uplink_name,
                        names.get(&w.dst_site_id).cloned().unwrap_or_default(),
                        w.dst_uplink_name,
                        w.status
                    )
                }),
                last_seen: ago(site.last_seen_at),
            }
        })
        .collect();
    let events = event_lines(&recent_events(&p, 20).await, &names);
    let page = OverviewPage {
        layout: p.layout("overview", true),
        sites,
        up: count("up"),
        degraded: count("degraded"),
        down: count("down"),
        events,
    };
    Ok(html(StatusCode::OK, page.render()))
}

// ---- site ------------------------------------------------------------------------------------

pub struct UplinkLine {
    pub index: i16,
    pub name: String,
    pub kind: String,
    pub address: String,
    pub bandwidth: String,
    pub cost: String,
}

pub struct PathLine {
    pub id: Uuid,
    pub from: String,
    pub to: String,
    pub status: String,
    pub latency: String,
    pub jitter: String,
    pub loss: String,
    pub mtu: String,
    pub score: String,
}

pub struct FlowLine {
    pub class: String,
    pub src: String,
    pub dst: String,
    pub protocol: String,
    pub bytes: String,
    pub last: String,
}

#[derive(Template)]
#[template(path = "site.html")]
struct SitePage {
    layout: Layout,
    id: Uuid,
    name: String,
    status: String,
    role: String,
    region: String,
    overlay: String,
    lans: String,
    intent: String,
    last_seen: String,
    peers: String,
    uplinks: Vec<UplinkLine>,
    paths: Vec<PathLine>,
    flows: Vec<FlowLine>,
}

fn path_line(view: &PathView, names: &HashMap<Uuid, String>) -> PathLine {
    let latest = view.latest.as_ref();
    let fmt = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.1} {unit}"));
    PathLine {
        id: view.id,
        from: format!(
            "{} {}",
            names.get(&view.src_site_id).cloned().unwrap_or_default(),
            view.src_uplink_name
        ),
        to: format!(
            "{} {}",
            names.get(&view.dst_site_id).cloned().unwrap_or_default(),
            view.dst_uplink_name
        ),
        status: view.status.clone(),
        latency: fmt(latest.map(|l| l.latency_ms), "ms"),
        jitter: fmt(latest.map(|l| l.jitter_ms), "ms"),
        loss: fmt(latest.map(|l| l.packet_loss_pct), "%"),
        mtu: latest
            .and_then(|l| l.mtu)
            .map_or("—".into(), |m| m.to_string()),
        score: latest
            .map(|l| l.score.to_string())
            .or_else(|| view.score.map(|s| s.to_string()))
            .unwrap_or_else(|| "—".into()),
    }
}

fn protocol_name(number: i16) -> String {
    match number {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// `GET /portal/t/{tenant}/sites/{id}`: uplinks, paths with their latest measurements, the
/// applied intent revision against the latest, last heartbeat, flows. Live.
pub async fn site(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let id = id_in(&req)?;
    let (site, intent, flow_rows) = p
        .ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let site = crate::api::sites::load_site(conn, id).await?;
                let intent: Option<(i64, Option<i64>, Option<DateTime<Utc>>)> = site_intents::table
                    .filter(site_intents::site_id.eq(id))
                    .select((
                        site_intents::revision,
                        site_intents::applied_revision,
                        site_intents::applied_at,
                    ))
                    .first(conn)
                    .await
                    .optional()?;
                let flow_rows: Vec<crate::api::flows::FlowRow> = flows::table
                    .filter(flows::site_id.eq(id))
                    .order(flows::last_packet_at.desc())
                    .limit(50)
                    .select(crate::api::flows::FlowRow::as_select())
                    .load(conn)
                    .await?;
                Ok((site, intent, flow_rows))
            })
        })
        .await?;
    let site = site.ok_or(PortalError::NotFound)?;
    let names = site_names(&p).await?;
    let mut views = crate::api::paths::all_views(&p.ctx, Some(id)).await?;
    views.retain(|v| v.src_site_id == id);
    crate::api::paths::with_latest(&p.ctx, &mut views).await;
    let intent = match intent {
        None => "none published yet".into(),
        Some((latest, Some(applied), at)) if applied >= latest => {
            format!("revision {applied} applied ({}), the latest", ago(at))
        }
        Some((latest, Some(applied), at)) => {
            format!(
                "revision {applied} applied ({}); latest is {latest}",
                ago(at)
            )
        }
        Some((latest, None, _)) => format!("latest is revision {latest}; none applied yet"),
    };
    let row = &site.site;
    let page = SitePage {
        layout: p.layout("overview", true),
        id,
        name: row.name.clone(),
        status: row.status.clone(),
        role: row.role.clone(),
        region: row.region.clone().unwrap_or_else(|| "—".into()),
        overlay: row
            .overlay_address
            .map_or("—".into(), |a| a.addr().to_string()),
        lans: row
            .lan_prefixes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        intent,
        last_seen: ago(row.last_seen_at),
        peers: {
            let mut peers: Vec<String> = views
                .iter()
                .map(|v| {
                    names
                        .get(&v.dst_site_id)
                        .cloned()
                        .unwrap_or_else(|| short(&v.dst_site_id))
                })
                .collect();
            peers.sort();
            peers.dedup();
            if peers.is_empty() {
                "none yet".into()
            } else {
                peers.join(", ")
            }
        },
        uplinks: site
            .uplinks
            .iter()
            .map(|u| UplinkLine {
                index: u.uplink_index,
                name: u.name.clone(),
                kind: u.interface_type.clone(),
                address: u.address.addr().to_string(),
                bandwidth: u
                    .bandwidth_mbps
                    .map_or("—".into(), |b| format!("{b} Mbit/s")),
                cost: format!(
                    "{:.3}{}",
                    u.cost_per_gb,
                    if u.metered { " (metered)" } else { "" }
                ),
            })
            .collect(),
        paths: views.iter().map(|v| path_line(v, &names)).collect(),
        flows: flow_rows
            .iter()
            .map(|f| FlowLine {
                class: f.app_class.clone(),
                src: format!("{}:{}", f.src_ip.addr(), f.src_port),
                dst: format!("{}:{}", f.dst_ip.addr(), f.dst_port),
                protocol: protocol_name(f.protocol),
                bytes: f.bytes_tx.to_string(),
                last: ago(Some(f.last_packet_at)),
            })
            .collect(),
    };
    Ok(html(StatusCode::OK, page.render()))
}

/// `POST .../sites/{id}/revoke`.
pub async fn revoke_site(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let id = id_in(&req)?;
    crate::api::sites::revoke_site(&p.ctx, id).await?;
    Ok(see_other(&p.tenant_path(&format!("sites/{id}"))))
}

/// `POST .../sites/{id}/delete`.
pub async fn delete_site(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    crate::api::sites::delete_site(&p.ctx, id_in(&req)?).await?;
    Ok(see_other(&p.tenant_path("")))
}

// ---- path ------------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "path.html")]
struct PathPage {
    layout: Layout,
    id: Uuid,
    from: String,
    to: String,
    status: String,
    latency: String,
    jitter: String,
    loss: String,
    mtu: String,
    score: String,
    ranges: Vec<String>,
    range: String,
    charts: Vec<String>,
    failovers: Vec<f64>,
    test_result: Option<String>,
}

const RANGES: &[&str] = &["15m", "1h", "6h", "24h", "7d"];

/// A range name's length and the bucket width that keeps a chart around 60-360 points.
fn range_span(range: &str) -> Option<(chrono::Duration, i64)> {
    Some(match range {
        "15m" => (chrono::Duration::minutes(15), 5),
        "1h" => (chrono::Duration::hours(1), 60),
        "6h" => (chrono::Duration::hours(6), 60),
        "24h" => (chrono::Duration::hours(24), 300),
        "7d" => (chrono::Duration::days(7), 1800),
        _ => return None,
    })
}

#[derive(Deserialize)]
pub struct PathQuery {
    range: Option<String>,
}

async fn path_page(
    p: &PortalCtx,
    id: Uuid,
    range: &str,
    test_result: Option<String>,
) -> PageResult {
    let (span, step) = range_span(range)
        .ok_or_else(|| PortalError::BadRequest(format!("range must be one of {RANGES:?}")))?;
    let mut view = [crate::api::paths::find(&p.ctx, id).await?];
    crate::api::paths::with_latest(&p.ctx, &mut view).await;
    let [view] = view;
    let names = site_names(p).await?;
    let to = Utc::now();
    // Whole buckets from a whole bucket: the history comes from the one-minute rollups.
    let from_s = (to - span).timestamp();
    let from =
        DateTime::<Utc>::from_timestamp(from_s - from_s.rem_euclid(step), 0).unwrap_or(to - span);
    let (from, to, _, points) = crate::api::paths::history(
        &p.ctx,
        id,
        crate::api::paths::MetricsQuery {
            from: Some(from),
            to: Some(to),
            step: Some(step),
        },
    )
    .await?;
    let failovers: Vec<f64> = recent_events(p, crate::events::RECENT_EVENTS as usize)
        .await
        .iter()
        .filter(|e| {
            matches!(&e.event, SdwanEvent::FailoverTriggered { from_path, to_path, .. }
                if from_path.0 == id || to_path.0 == id)
        })
        .map(|e| e.at_unix_ms as f64 / 1000.0)
        .collect();
    let markers: Vec<Marker> = failovers
        .iter()
        .map(|at| Marker {
            at: *at,
            label: DateTime::<Utc>::from_timestamp(*at as i64, 0)
                .map(|t| format!("failover at {}", when(t)))
                .unwrap_or_else(|| "failover".into()),
        })
        .collect();
    let series = |pick: fn(&crate::api::paths::Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|pt| (pt.at.timestamp() as f64, pick(pt)))
            .collect()
    };
    let (f, t) = (from.timestamp() as f64, to.timestamp() as f64);
    let charts = vec![
        chart::line_chart(
            "chart-latency",
            &Series {
                title: "Latency",
                unit: "ms",
                points: &series(|pt| pt.latency_ms),
                min_top: 10.0,
            },
            f,
            t,
            &markers,
        ),
        chart::line_chart(
            "chart-jitter",
            &Series {
                title: "Jitter",
                unit: "ms",
                points: &series(|pt| pt.jitter_ms),
                min_top: 5.0,
            },
            f,
            t,
            &markers,
        ),
        chart::line_chart(
            "chart-loss",
            &Series {
                title: "Loss",
                unit: "%",
                points: &series(|pt| pt.packet_loss_pct),
                min_top: 1.0,
            },
            f,
            t,
            &markers,
        ),
        chart::line_chart(
            "chart-score",
            &Series {
                title: "Score",
                unit: "0-100",
                points: &series(|pt| pt.score),
                min_top: 100.0,
            },
            f,
            t,
            &markers,
        ),
    ];
    let line = path_line(&view, &names);
    let page = PathPage {
        layout: p.layout("overview", false),
        id,
        from: line.from,
        to: line.to,
        status: line.status,
        latency: line.latency,
        jitter: line.jitter,
        loss: line.loss,
        mtu: line.mtu,
        score: line.score,
        ranges: RANGES.iter().map(|r| (*r).to_owned()).collect(),
        range: range.to_owned(),
        charts,
        failovers,
        test_result,
    };
    Ok(html(StatusCode::OK, page.render()))
}

/// `GET /portal/t/{tenant}/paths/{id}?range=`: latency, jitter, loss and score over the range
/// with failovers marked; the on-demand test.
pub async fn path(req: HttpRequest, query: web::Query<PathQuery>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let range = query.range.clone().unwrap_or_else(|| "1h".into());
    path_page(&p, id_in(&req)?, &range, None).await
}

#[derive(Deserialize)]
pub struct TestForm {
    csrf: String,
    duration_s: u32,
}

/// `POST .../paths/{id}/test`: the API's on-demand test; the page shows what the edge measured.
pub async fn test_path(req: HttpRequest, form: web::Form<TestForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let id = id_in(&req)?;
    let (_, metrics) = crate::api::paths::run_test(&p.ctx, id, form.duration_s).await?;
    let result = format!(
        "Measured now over {} s: {} Mbit/s, {:.1} ms, {:.1} ms jitter, {:.1} % loss",
        form.duration_s,
        metrics
            .bandwidth_mbps
            .map_or("?".into(), |b| format!("{b:.1}")),
        metrics.latency_ms,
        metrics.jitter_ms,
        metrics.packet_loss_pct
    );
    path_page(&p, id, "1h", Some(result)).await
}

// ---- onboarding ------------------------------------------------------------------------------

pub struct Created {
    pub command: String,
    pub ansible: String,
    pub expires: String,
}

pub struct TokenLine {
    pub site: String,
    pub state: &'static str,
    pub created: String,
    pub expires: String,
}

#[derive(Template)]
#[template(path = "onboarding.html")]
struct OnboardingPage {
    layout: Layout,
    created: Option<Created>,
    error: Option<String>,
    site_name: String,
    lan_prefixes: String,
    expires_in_hours: u32,
    tokens: Vec<TokenLine>,
}

/// A token as listed: its site's name, created, expires, redeemed and revoked.
type TokenTuple = (
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

async fn token_lines(p: &PortalCtx) -> Result<Vec<TokenLine>, PortalError> {
    use crate::db::schema::enrollment_tokens as t;
    let rows: Vec<TokenTuple> = p
        .ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                Ok(t::table
                    .left_join(sites::table.on(sites::id.eq(t::site_id)))
                    .order(t::created_at.desc())
                    .limit(50)
                    .select((
                        sites::name.nullable(),
                        t::created_at,
                        t::expires_at,
                        t::redeemed_at,
                        t::revoked_at,
                    ))
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(|(site, created, expires, redeemed, revoked)| TokenLine {
            site: site.unwrap_or_else(|| "(deleted)".into()),
            state: if redeemed.is_some() {
                "redeemed"
            } else if revoked.is_some() {
                "revoked"
            } else if expires <= now {
                "expired"
            } else {
                "pending"
            },
            created: when(created),
            expires: when(expires),
        })
        .collect())
}

async fn onboarding_page(
    p: &PortalCtx,
    status: StatusCode,
    created: Option<Created>,
    error: Option<String>,
    form: Option<&TokenForm>,
) -> PageResult {
    let page = OnboardingPage {
        layout: p.layout("onboarding", false),
        created,
        error,
        site_name: form.map(|f| f.site_name.clone()).unwrap_or_default(),
        lan_prefixes: form.map(|f| f.lan_prefixes.clone()).unwrap_or_default(),
        expires_in_hours: form.map_or(24, |f| f.expires_in_hours),
        tokens: token_lines(p).await?,
    };
    Ok(html(status, page.render()))
}

/// `GET /portal/t/{tenant}/onboarding`.
pub async fn onboarding(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    onboarding_page(&p, StatusCode::OK, None, None, None).await
}

#[derive(Deserialize)]
pub struct TokenForm {
    csrf: String,
    site_name: String,
    #[serde(default)]
    lan_prefixes: String,
    expires_in_hours: u32,
}

/// The ansible inventory lines for a host enrolling with `secret` (pure).
pub fn ansible_snippet(controller_url: &str, site: &str, secret: &str) -> String {
    format!(
        "# host_vars/{site}.yml (encrypt with ansible-vault)\npatronus_edge_controller_url: \"{controller_url}\"\npatronus_edge_enrollment_token: \"{secret}\""
    )
}

/// `POST /portal/t/{tenant}/onboarding`: a token through the API's own function; the page
/// shows the command once.
pub async fn create_token(req: HttpRequest, form: web::Form<TokenForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let form = form.into_inner();
    let lan_prefixes: Result<Vec<ipnet::IpNet>, _> = form
        .lan_prefixes
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect();
    let lan_prefixes = match lan_prefixes {
        Ok(prefixes) => prefixes,
        Err(e) => {
            return onboarding_page(
                &p,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                Some(format!("LAN prefixes: {e} (write them like 10.20.0.0/24)")),
                Some(&form),
            )
            .await
        }
    };
    let controller_url = crate::api::enrollment::edge_facing_url(&p.ctx.state, &req);
    let body = crate::api::enrollment::CreateEnrollmentToken {
        site: form.site_name.trim().to_owned(),
        region: None,
        role: None,
        lan_prefixes,
        ttl_s: Some(u64::from(form.expires_in_hours) * 3600),
    };
    match crate::api::enrollment::create_token(&p.ctx, body, &controller_url).await {
        Ok(created) => {
            let page = Created {
                ansible: ansible_snippet(
                    &controller_url,
                    created.token.site_name.as_deref().unwrap_or_default(),
                    &created.secret,
                ),
                command: created.command,
                expires: when(created.token.expires_at),
            };
            onboarding_page(&p, StatusCode::CREATED, Some(page), None, None).await
        }
        Err(e) if e.status.is_client_error() && e.status != StatusCode::FORBIDDEN => {
            onboarding_page(&p, e.status, None, Some(e.detail), Some(&form)).await
        }
        Err(e) => Err(e.into()),
    }
}

// ---- events and audit ------------------------------------------------------------------------

/// An audit entry as listed: when, who, what, the target's kind and id.
type AuditTuple = (DateTime<Utc>, String, String, String, Option<String>);

pub struct AuditLine {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    layout: Layout,
    kinds: Vec<String>,
    kind: String,
    action: String,
    events: Vec<EventLine>,
    audit: Vec<AuditLine>,
}

const EVENT_KINDS: &[&str] = &[
    "site_joined",
    "site_left",
    "site_status_changed",
    "path_established",
    "path_failed",
    "path_degraded",
    "failover_triggered",
    "policy_applied",
    "topology_changed",
    "intent_applied",
    "intent_rejected",
];

#[derive(Deserialize)]
pub struct EventsQuery {
    kind: Option<String>,
    /// Audit log: only this action (e.g. `policy.update`).
    action: Option<String>,
}

/// `GET /portal/t/{tenant}/events?kind=`: the tenant's recent events (live) and audit log.
pub async fn events(req: HttpRequest, query: web::Query<EventsQuery>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let kind = query.kind.clone().unwrap_or_default();
    if !kind.is_empty() && !EVENT_KINDS.contains(&kind.as_str()) {
        return Err(PortalError::BadRequest(format!(
            "kind must be one of {}",
            EVENT_KINDS.join(", ")
        )));
    }
    let names = site_names(&p).await?;
    let mut lines = event_lines(
        &recent_events(&p, crate::events::RECENT_EVENTS as usize).await,
        &names,
    );
    if !kind.is_empty() {
        lines.retain(|l| l.kind == kind);
    }
    lines.truncate(200);
    let action = query
        .action
        .clone()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    if action.as_ref().is_some_and(|a| {
        a.len() > 64
            || !a
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
    }) {
        return Err(PortalError::BadRequest(
            "an audit action looks like policy.update or site.revoke".into(),
        ));
    }
    let tenant = p.tenant.0;
    let filter = action.clone();
    let audit: Vec<AuditTuple> = p
        .ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut q = audit_log::table
                    .filter(audit_log::tenant_id.eq(tenant))
                    .into_boxed();
                if let Some(action) = filter {
                    q = q.filter(audit_log::action.eq(action));
                }
                Ok(q.order(audit_log::id.desc())
                    .limit(100)
                    .select((
                        audit_log::at,
                        audit_log::actor_label,
                        audit_log::action,
                        audit_log::target_kind,
                        audit_log::target_id,
                    ))
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let page = EventsPage {
        layout: p.layout("events", true),
        kinds: EVENT_KINDS.iter().map(|k| (*k).to_owned()).collect(),
        kind,
        action: action.unwrap_or_default(),
        events: lines,
        audit: audit
            .into_iter()
            .map(|(at, actor, action, kind, target)| AuditLine {
                at: when(at),
                actor,
                action,
                target: format!("{kind} {}", target.unwrap_or_default()),
            })
            .collect(),
    };
    Ok(html(StatusCode::OK, page.render()))
}

// ---- topology and policies -------------------------------------------------------------------

#[derive(Template)]
#[template(path = "topology.html")]
struct TopologyPage {
    layout: Layout,
    svg: String,
}

/// One site on the topology drawing.
pub struct Node {
    pub id: Uuid,
    pub name: String,
    pub hub: bool,
}

/// One site-to-site link: the best status among its paths.
pub struct Link {
    pub a: Uuid,
    pub b: Uuid,
    pub status: String,
    /// The path's score (0-100) when measured.
    pub score: Option<i16>,
    pub path: Uuid,
}

/// A link's colour class (pure): by score where measured (80+ good, 50+ fair, else poor),
/// a down path always red, by status otherwise.
pub fn link_class(status: &str, score: Option<i16>) -> &'static str {
    match (status, score) {
        ("down", _) => "status-down",
        (_, Some(s)) if s >= 80 => "status-up",
        (_, Some(s)) if s >= 50 => "status-degraded",
        (_, Some(_)) => "status-down",
        ("up", None) => "status-up",
        ("degraded", None) => "status-degraded",
        _ => "status-unknown",
    }
}

/// The mesh as SVG (pure): sites on a circle (hubs in an inner ring), each link a line
/// coloured by its best path's score ([`link_class`]); sites and links are links to their
/// pages.
pub fn topology_svg(tenant_path: &str, nodes: &[Node], links: &[Link]) -> String {
    use std::fmt::Write as _;
    let (w, h) = (900.0f64, 640.0f64);
    let (cx, cy) = (w / 2.0, h / 2.0);
    let hubs: Vec<&Node> = nodes.iter().filter(|n| n.hub).collect();
    let spokes: Vec<&Node> = nodes.iter().filter(|n| !n.hub).collect();
    let mut at: HashMap<Uuid, (f64, f64)> = HashMap::new();
    for (ring, radius) in [(&hubs, 110.0), (&spokes, 260.0)] {
        let n = ring.len().max(1) as f64;
        for (i, node) in ring.iter().enumerate() {
            let angle = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            let r = if ring.len() == 1 && radius < 200.0 {
                0.0
            } else {
                radius
            };
            at.insert(node.id, (cx + r * angle.cos(), cy + r * angle.sin()));
        }
    }
    let mut svg = format!(
        r#"<svg id="topology" class="topology" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="mesh topology">"#
    );
    for link in links {
        let (Some(a), Some(b)) = (at.get(&link.a), at.get(&link.b)) else {
            continue;
        };
        let _ = write!(
            svg,
            r#"<a href="{base}paths/{path}"><line class="{class}" data-path-id="{path}" x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"><title>{status}{score}</title></line></a>"#,
            a.0,
            a.1,
            b.0,
            b.1,
            base = chart::escape(tenant_path),
            path = link.path,
            class = link_class(&link.status, link.score),
            status = chart::escape(&link.status),
            score = link.score.map_or(String::new(), |s| format!(", score {s}")),
        );
    }
    for node in nodes {
        let Some((x, y)) = at.get(&node.id) else {
            continue;
        };
        let _ = write!(
            svg,
            r#"<a href="{base}sites/{id}"><g class="site{hub}" data-site-id="{id}"><circle cx="{x:.1}" cy="{y:.1}" r="{r}"/><text x="{x:.1}" y="{ty:.1}" text-anchor="middle">{name}</text></g></a>"#,
            base = chart::escape(tenant_path),
            id = node.id,
            hub = if node.hub { " hub" } else { "" },
            r = if node.hub { 12 } else { 9 },
            ty = y + 26.0,
            name = chart::escape(&node.name),
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `GET /portal/t/{tenant}/topology`: the mesh, paths coloured by status. Live.
pub async fn topology(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let rows: Vec<(Uuid, String, String)> = p
        .ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                Ok(sites::table
                    .order(sites::name)
                    .select((sites::id, sites::name, sites::role))
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let nodes: Vec<Node> = rows
        .into_iter()
        .map(|(id, name, role)| Node {
            id,
            name,
            hub: role == "hub",
        })
        .collect();
    let paths = crate::api::paths::all_views(&p.ctx, None).await?;
    // Each pair's best path: the least bad status, then the highest score.
    let mut best: HashMap<(Uuid, Uuid), &PathView> = HashMap::new();
    let rank = |p: &PathView| (badness(&p.status), -i32::from(p.score.unwrap_or(-1)));
    for path in &paths {
        let key = if path.src_site_id < path.dst_site_id {
            (path.src_site_id, path.dst_site_id)
        } else {
            (path.dst_site_id, path.src_site_id)
        };
        let entry = best.entry(key).or_insert(path);
        if rank(path) < rank(entry) {
            *entry = path;
        }
    }
    let links: Vec<Link> = best
        .into_iter()
        .map(|((a, b), p)| Link {
            a,
            b,
            status: p.status.clone(),
            score: p.score,
            path: p.id,
        })
        .collect();
    let page = TopologyPage {
        svg: topology_svg(&p.tenant_path(""), &nodes, &links),
        layout: p.layout("topology", true),
    };
    Ok(html(StatusCode::OK, page.render()))
}

pub struct PolicyLine {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub priority: i32,
    pub enabled: bool,
    pub summary: String,
}

#[derive(Template)]
#[template(path = "policies.html")]
struct PoliciesPage {
    layout: Layout,
    policies: Vec<PolicyLine>,
    classes: Vec<(String, String)>,
}

/// A one-line reading of a routing policy's spec (others: their JSON).
fn policy_summary(kind: &str, spec: &serde_json::Value) -> String {
    if kind != "routing" {
        return serde_json::to_string(spec).unwrap_or_default();
    }
    let form = super::policy_form::from_stored("", 0, true, spec);
    let mut parts = vec![format!("class {}", form.app_class)];
    let traffic: Vec<String> = [
        (!form.protocol.is_empty()).then(|| form.protocol.clone()),
        (!form.dst_ports.is_empty()).then(|| format!("ports {}", form.dst_ports)),
        (!form.dst_prefixes.is_empty()).then(|| format!("to {}", form.dst_prefixes)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if traffic.is_empty() {
        parts.push("traffic: the class's catalog signatures, or everything".into());
    } else {
        parts.push(traffic.join(" "));
    }
    parts.push(format!(
        "→ {} ({})",
        form.path_preference.replace('_', " "),
        form.load_balancing.replace('_', " ")
    ));
    if !form.max_latency_ms.is_empty() || !form.max_loss_pct.is_empty() {
        parts.push(format!(
            "SLA {}{}",
            if form.max_latency_ms.is_empty() {
                String::new()
            } else {
                format!("≤ {} ms ", form.max_latency_ms)
            },
            if form.max_loss_pct.is_empty() {
                String::new()
            } else {
                format!("≤ {} % loss", form.max_loss_pct)
            }
        ));
    }
    if !form.probe_interval_ms.is_empty() {
        parts.push(format!("probes every {} ms", form.probe_interval_ms));
    }
    parts.join(", ")
}

async fn load_policies(p: &PortalCtx) -> Result<Vec<crate::api::policies::PolicyRow>, PortalError> {
    Ok(p.ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                Ok(policies::table
                    .order((policies::kind, policies::priority.desc(), policies::name))
                    .select(crate::api::policies::PolicyRow::as_select())
                    .load(conn)
                    .await?)
            })
        })
        .await?)
}

/// `GET /portal/t/{tenant}/policies`: by kind and priority, with enable/disable, reorder,
/// edit and delete for writers.
pub async fn policies(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let rows = load_policies(&p).await?;
    let page = PoliciesPage {
        layout: p.layout("policies", false),
        policies: rows
            .into_iter()
            .map(|row| PolicyLine {
                id: row.id,
                summary: policy_summary(&row.kind, &row.spec),
                name: row.name,
                kind: row.kind,
                priority: row.priority,
                enabled: row.enabled,
            })
            .collect(),
        classes: patronus_proto::catalog::CATALOG
            .iter()
            .map(|a| (a.class.to_owned(), a.description.to_owned()))
            .collect(),
    };
    Ok(html(StatusCode::OK, page.render()))
}

#[derive(Template)]
#[template(path = "policy_form.html")]
struct PolicyFormPage {
    layout: Layout,
    /// `None` for a new policy.
    id: Option<Uuid>,
    form: super::policy_form::RoutingForm,
    errors: super::policy_form::FieldErrors,
    general: Option<String>,
    preferences: Vec<(String, String)>,
    balancing: Vec<(String, String)>,
    protocols: Vec<String>,
    classes: Vec<String>,
}

fn policy_form_page(
    p: &PortalCtx,
    status: StatusCode,
    id: Option<Uuid>,
    form: super::policy_form::RoutingForm,
    errors: super::policy_form::FieldErrors,
    general: Option<String>,
) -> HttpResponse {
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    let page = PolicyFormPage {
        layout: p.layout("policies", false),
        id,
        form,
        errors,
        general,
        preferences: pairs(super::policy_form::PREFERENCES),
        balancing: pairs(super::policy_form::BALANCING),
        protocols: super::policy_form::PROTOCOLS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        classes: patronus_proto::catalog::CATALOG
            .iter()
            .map(|a| a.class.to_owned())
            .collect(),
    };
    html(status, page.render())
}

/// `GET /portal/t/{tenant}/policies/new`: an empty routing-policy form.
pub async fn new_policy(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    if !p.layout("policies", false).can_write {
        return Err(PortalError::Forbidden("your role is read-only".into()));
    }
    let form = super::policy_form::RoutingForm {
        priority: "100".into(),
        enabled: Some("on".into()),
        path_preference: "lowest_latency".into(),
        load_balancing: "flow_hash".into(),
        ..Default::default()
    };
    Ok(policy_form_page(
        &p,
        StatusCode::OK,
        None,
        form,
        Default::default(),
        None,
    ))
}

async fn load_policy(
    p: &PortalCtx,
    id: Uuid,
) -> Result<crate::api::policies::PolicyRow, PortalError> {
    p.ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                Ok(policies::table
                    .find(id)
                    .select(crate::api::policies::PolicyRow::as_select())
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?
        .ok_or(PortalError::NotFound)
}

/// `GET /portal/t/{tenant}/policies/{id}`: a routing policy's form (other kinds are edited
/// through the API).
pub async fn edit_policy(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let id = id_in(&req)?;
    let row = load_policy(&p, id).await?;
    if row.kind != "routing" {
        return Err(PortalError::BadRequest(format!(
            "{} policies are edited through the API (PUT /api/v1/policies/{id}); the portal edits routing policies",
            row.kind
        )));
    }
    let form = super::policy_form::from_stored(&row.name, row.priority, row.enabled, &row.spec);
    Ok(policy_form_page(
        &p,
        StatusCode::OK,
        Some(id),
        form,
        Default::default(),
        None,
    ))
}

/// Create (`id` none) or replace a routing policy from the form; errors go beside their
/// fields.
async fn save_policy(
    p: &PortalCtx,
    id: Option<Uuid>,
    form: super::policy_form::RoutingForm,
) -> PageResult {
    p.check_write(&form.csrf)?;
    let body = match super::policy_form::to_body(&form) {
        Ok(body) => body,
        Err(errors) => {
            return Ok(policy_form_page(
                p,
                StatusCode::UNPROCESSABLE_ENTITY,
                id,
                form,
                errors,
                Some("Some fields need fixing.".into()),
            ))
        }
    };
    let saved = match id {
        None => crate::api::policies::create_policy(&p.ctx, body).await,
        Some(id) => crate::api::policies::replace_policy(&p.ctx, id, body).await,
    };
    match saved {
        Ok(_) => Ok(see_other(&p.tenant_path("policies"))),
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let mut errors = super::policy_form::FieldErrors::new();
            let general = match super::policy_form::field_of(&e.detail) {
                Some(field) => {
                    errors.insert(field.to_owned(), e.detail.clone());
                    Some("Some fields need fixing.".into())
                }
                None => Some(e.detail.clone()),
            };
            Ok(policy_form_page(
                p,
                StatusCode::UNPROCESSABLE_ENTITY,
                id,
                form,
                errors,
                general,
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /portal/t/{tenant}/policies`: create.
pub async fn create_policy(
    req: HttpRequest,
    form: web::Form<super::policy_form::RoutingForm>,
) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    save_policy(&p, None, form.into_inner()).await
}

/// `POST /portal/t/{tenant}/policies/{id}`: replace.
pub async fn update_policy(
    req: HttpRequest,
    form: web::Form<super::policy_form::RoutingForm>,
) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    let id = id_in(&req)?;
    load_policy(&p, id).await?;
    save_policy(&p, Some(id), form.into_inner()).await
}

fn body_of(
    row: &crate::api::policies::PolicyRow,
) -> Result<crate::api::policies::PolicyBody, PortalError> {
    Ok(crate::api::policies::PolicyBody {
        name: row.name.clone(),
        kind: crate::api::policies::PolicyKind::parse(&row.kind)
            .ok_or_else(|| PortalError::Internal(format!("policy of kind {}", row.kind)))?,
        priority: u16::try_from(row.priority).unwrap_or(u16::MAX),
        enabled: row.enabled,
        site_ids: row.site_ids.clone(),
        spec: row.spec.clone(),
    })
}

/// `POST .../policies/{id}/toggle`: enable or disable.
pub async fn toggle_policy(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let id = id_in(&req)?;
    let row = load_policy(&p, id).await?;
    let mut body = body_of(&row)?;
    body.enabled = !row.enabled;
    crate::api::policies::replace_policy(&p.ctx, id, body).await?;
    Ok(see_other(&p.tenant_path("policies")))
}

/// `POST .../policies/{id}/delete`.
pub async fn delete_policy(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    crate::api::policies::delete_policy(&p.ctx, id_in(&req)?).await?;
    Ok(see_other(&p.tenant_path("policies")))
}

/// The priorities after moving the policy at `index` one place up (`up`) or down among
/// policies ordered by priority, highest first (pure): `(index, new priority)` pairs to
/// write. Equal neighbours are told apart by one.
pub fn reorder(priorities: &[u16], index: usize, up: bool) -> Vec<(usize, u16)> {
    let other = if up {
        index.checked_sub(1)
    } else {
        Some(index + 1).filter(|i| *i < priorities.len())
    };
    let Some(other) = other else {
        return Vec::new();
    };
    let (mine, theirs) = (priorities[index], priorities[other]);
    if mine != theirs {
        return vec![(index, theirs), (other, mine)];
    }
    let moved = if up {
        mine.saturating_add(1)
    } else {
        mine.saturating_sub(1)
    };
    if moved == mine {
        return Vec::new();
    }
    vec![(index, moved)]
}

async fn move_policy(req: HttpRequest, form: web::Form<CsrfForm>, up: bool) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let id = id_in(&req)?;
    let row = load_policy(&p, id).await?;
    let same_kind: Vec<crate::api::policies::PolicyRow> = load_policies(&p)
        .await?
        .into_iter()
        .filter(|r| r.kind == row.kind)
        .collect();
    let index = same_kind
        .iter()
        .position(|r| r.id == id)
        .ok_or(PortalError::NotFound)?;
    let priorities: Vec<u16> = same_kind
        .iter()
        .map(|r| u16::try_from(r.priority).unwrap_or(u16::MAX))
        .collect();
    for (i, priority) in reorder(&priorities, index, up) {
        let mut body = body_of(&same_kind[i])?;
        body.priority = priority;
        crate::api::policies::replace_policy(&p.ctx, same_kind[i].id, body).await?;
    }
    Ok(see_other(&p.tenant_path("policies")))
}

/// `POST .../policies/{id}/up`: one place higher in priority.
pub async fn raise_policy(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    move_policy(req, form, true).await
}

/// `POST .../policies/{id}/down`: one place lower.
pub async fn lower_policy(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    move_policy(req, form, false).await
}

// ---- operators and API tokens ---------------------------------------------------------------

pub struct OperatorLine {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub role: String,
    pub disabled: bool,
    pub last_login: String,
}

pub struct ApiTokenLine {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub created: String,
    pub expires: String,
    pub last_used: String,
    pub revoked: bool,
}

#[derive(Template)]
#[template(path = "admin.html")]
struct AdminPage {
    layout: Layout,
    operators: Vec<OperatorLine>,
    tokens: Vec<ApiTokenLine>,
    error: Option<String>,
    /// A token just created: its name and secret, shown this once.
    created: Option<(String, String)>,
}

async fn admin_page(
    p: &PortalCtx,
    status: StatusCode,
    error: Option<String>,
    created: Option<(String, String)>,
) -> PageResult {
    use crate::db::schema::{api_tokens, operators};
    if !p.ctx.principal.role.can_write() {
        return Err(PortalError::Forbidden(
            "operators and API tokens are managed by admins".into(),
        ));
    }
    let tenant = p.tenant.0;
    let operators: Vec<crate::api::operators::Operator> = p
        .ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                Ok(operators::table
                    .filter(operators::tenant_id.eq(tenant))
                    .order(operators::email)
                    .select(crate::api::operators::Operator::as_select())
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let tokens: Vec<crate::api::tokens::ApiToken> = p
        .ctx
        .tenant_tx(|conn| {
            Box::pin(async move {
                Ok(api_tokens::table
                    .order(api_tokens::created_at.desc())
                    .limit(200)
                    .select(crate::api::tokens::ApiToken::as_select())
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let page = AdminPage {
        layout: p.layout("admin", false),
        operators: operators
            .into_iter()
            .map(|o| OperatorLine {
                id: o.id,
                email: o.email,
                name: o.display_name,
                role: o.role,
                disabled: o.disabled_at.is_some(),
                last_login: ago(o.last_login_at),
            })
            .collect(),
        tokens: tokens
            .into_iter()
            .map(|t| ApiTokenLine {
                id: t.id,
                name: t.name,
                role: t.role,
                created: when(t.created_at),
                expires: t.expires_at.map_or("never".into(), when),
                last_used: ago(t.last_used_at),
                revoked: t.revoked_at.is_some(),
            })
            .collect(),
        error,
        created,
    };
    Ok(html(status, page.render()))
}

/// `GET /portal/t/{tenant}/admin`: the tenant's operators and API tokens (admins only).
pub async fn admin(req: HttpRequest) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    admin_page(&p, StatusCode::OK, None, None).await
}

#[derive(Deserialize)]
pub struct OperatorForm {
    csrf: String,
    email: String,
    #[serde(default)]
    display_name: String,
    password: String,
    role: String,
}

/// `POST /portal/t/{tenant}/admin/operators`: a new operator of the tenant.
pub async fn add_operator(req: HttpRequest, form: web::Form<OperatorForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let form = form.into_inner();
    let role = match crate::auth::Role::parse(&form.role) {
        Some(role @ (crate::auth::Role::TenantAdmin | crate::auth::Role::TenantViewer)) => role,
        _ => {
            return admin_page(
                &p,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("role must be tenant_admin or tenant_viewer".into()),
                None,
            )
            .await
        }
    };
    let body = crate::api::operators::CreateOperator {
        email: form.email.trim().to_owned(),
        password: form.password,
        role,
        display_name: form.display_name.trim().to_owned(),
    };
    match crate::api::operators::create_operator(&p.ctx, body).await {
        Ok(_) => Ok(see_other(&p.tenant_path("admin"))),
        Err(e) if e.status.is_client_error() && e.status != StatusCode::FORBIDDEN => {
            admin_page(&p, e.status, Some(e.detail), None).await
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /portal/t/{tenant}/admin/operators/{id}/toggle`: disable or enable an operator.
pub async fn toggle_operator(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    use crate::db::schema::operators;
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let id = id_in(&req)?;
    let tenant = p.tenant.0;
    let disabled: Option<Option<DateTime<Utc>>> = p
        .ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                Ok(operators::table
                    .filter(operators::id.eq(id))
                    .filter(operators::tenant_id.eq(tenant))
                    .select(operators::disabled_at)
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?;
    let disabled = disabled.ok_or(PortalError::NotFound)?;
    let body = crate::api::operators::UpdateOperator {
        disabled: Some(disabled.is_none()),
        ..Default::default()
    };
    crate::api::operators::update_operator(&p.ctx, id, body).await?;
    Ok(see_other(&p.tenant_path("admin")))
}

#[derive(Deserialize)]
pub struct ApiTokenForm {
    csrf: String,
    name: String,
    role: String,
    #[serde(default)]
    expires_in_days: String,
}

/// `POST /portal/t/{tenant}/admin/api-tokens`: a new API token; the page shows it once.
pub async fn add_api_token(req: HttpRequest, form: web::Form<ApiTokenForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    let form = form.into_inner();
    let role = crate::auth::Role::parse(&form.role);
    let days = form.expires_in_days.trim();
    let days = if days.is_empty() {
        Ok(None)
    } else {
        days.parse::<i64>().map(Some)
    };
    let (Some(role), Ok(expires_in_days)) = (role, days) else {
        return admin_page(
            &p,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("role must be tenant_admin or tenant_viewer, and expiry a number of days".into()),
            None,
        )
        .await;
    };
    let body = crate::api::tokens::CreateToken {
        name: form.name.trim().to_owned(),
        role,
        expires_in_days,
    };
    match crate::api::tokens::create_api_token(&p.ctx, body).await {
        Ok((token, secret)) => {
            admin_page(&p, StatusCode::CREATED, None, Some((token.name, secret))).await
        }
        Err(e) if e.status.is_client_error() && e.status != StatusCode::FORBIDDEN => {
            admin_page(&p, e.status, Some(e.detail), None).await
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /portal/t/{tenant}/admin/api-tokens/{id}/revoke`.
pub async fn revoke_api_token(req: HttpRequest, form: web::Form<CsrfForm>) -> PageResult {
    let p = PortalCtx::from_request(&req).await?;
    p.check_write(&form.csrf)?;
    crate::api::tokens::revoke_api_token(&p.ctx, id_in(&req)?).await?;
    Ok(see_other(&p.tenant_path("admin")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use patronus_proto::{PathId, SiteId};

    #[test]
    fn events_read_as_sentences_with_site_names() {
        let site = Uuid::from_u128(1);
        let names: HashMap<Uuid, String> = [(site, "branch-1".to_owned())].into();
        let (kind, summary) = describe(&SdwanEvent::SiteLeft { site: SiteId(site) }, &names);
        assert_eq!(kind, "site_left");
        assert_eq!(summary, "site branch-1 left");
        let (kind, summary) = describe(
            &SdwanEvent::FailoverTriggered {
                from_path: PathId(Uuid::from_u128(0xaaaa_bbbb << 96)),
                to_path: PathId(Uuid::from_u128(2)),
                reason: "loss".into(),
            },
            &names,
        );
        assert_eq!(kind, "failover_triggered");
        assert!(
            summary.starts_with("failover from path aaaabbbb to 00000000: loss"),
            "{summary}"
        );
        for kind in EVENT_KINDS {
            assert!(!kind.is_empty());
        }
    }

    #[test]
    fn the_topology_escapes_names_and_links_sites_and_paths() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let svg = topology_svg(
            "/portal/t/x/",
            &[
                Node {
                    id: a,
                    name: "<script>alert(1)</script>".into(),
                    hub: true,
                },
                Node {
                    id: b,
                    name: "b".into(),
                    hub: false,
                },
            ],
            &[Link {
                a,
                b,
                status: "down".into(),
                score: Some(90),
                path: Uuid::from_u128(3),
            }],
        );
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains(r#"class="status-down""#));
        assert!(svg.contains(&format!("/portal/t/x/sites/{a}")));
        assert!(svg.contains(&format!("/portal/t/x/paths/{}", Uuid::from_u128(3))));
    }

    #[test]
    fn links_are_coloured_by_score_and_down_is_always_red() {
        assert_eq!(link_class("up", Some(95)), "status-up");
        assert_eq!(link_class("up", Some(65)), "status-degraded");
        assert_eq!(link_class("degraded", Some(30)), "status-down");
        assert_eq!(link_class("down", Some(99)), "status-down");
        assert_eq!(link_class("up", None), "status-up");
        assert_eq!(link_class("unknown", None), "status-unknown");
    }

    #[test]
    fn ranges_give_bounded_point_counts() {
        for range in RANGES {
            let (span, step) = range_span(range).unwrap();
            let points = span.num_seconds() / step;
            assert!((60..=720).contains(&points), "{range}: {points}");
        }
        assert!(range_span("1y").is_none());
    }

    #[test]
    fn reordering_swaps_with_the_neighbour_or_steps_past_an_equal_one() {
        assert_eq!(reorder(&[300, 200, 100], 1, true), vec![(1, 300), (0, 200)]);
        assert_eq!(
            reorder(&[300, 200, 100], 1, false),
            vec![(1, 100), (2, 200)]
        );
        assert_eq!(reorder(&[300, 200], 0, true), vec![]);
        assert_eq!(reorder(&[300, 200], 1, false), vec![]);
        assert_eq!(reorder(&[100, 100], 1, true), vec![(1, 101)]);
        assert_eq!(reorder(&[0, 0], 0, false), vec![]);
    }

    #[test]
    fn the_ansible_snippet_names_the_controller_and_the_token() {
        let s = ansible_snippet("http://10.0.0.1:8080", "branch", "pet_abc");
        assert!(s.contains("patronus_edge_controller_url: \"http://10.0.0.1:8080\""));
        assert!(s.contains("patronus_edge_enrollment_token: \"pet_abc\""));
    }
}

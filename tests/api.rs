//! The REST API against the real PostgreSQL, Redis and NATS: sign-in, tenancy, CRUD, bad input,
//! roles, rate limits, API tokens and the audit trail. Each test has its own database.

use std::net::SocketAddr;

use actix_web::dev::ServiceResponse;
use actix_web::http::{Method, StatusCode};
use actix_web::{middleware, test, web, App};
use patronus_controller::server::{configure, AppState};
use patronus_test_support::{TestDatabase, TestEnv};
use serde_json::{json, Value};

struct Harness {
    database: TestDatabase,
    state: AppState,
    /// A unique source address per test, so rate limits of parallel tests do not collide.
    peer: SocketAddr,
}

async fn harness() -> anyhow::Result<Harness> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let config = env.controller_config(&database.app_url)?;
    let state = AppState::connect(&config).await?;
    let octets = uuid::Uuid::new_v4().as_bytes()[..3].to_vec();
    let peer = SocketAddr::from(([10, octets[0], octets[1], octets[2]], 40000));
    Ok(Harness {
        database,
        state,
        peer,
    })
}

impl Harness {
    /// Close every connection of the test, then drop its database.
    async fn finish(self) -> anyhow::Result<()> {
        self.state.db.close();
        drop(self.state);
        self.database.drop_now().await
    }
}

macro_rules! app {
    ($h:expr) => {
        test::init_service(
            App::new()
                .wrap(middleware::from_fn(patronus_controller::api::request_id))
                .app_data(web::Data::new($h.state.clone()))
                .configure(configure),
        )
        .await
    };
}

/// Send a request; returns status and JSON body (Null when empty).
macro_rules! call {
    ($app:expr, $h:expr, $method:expr, $path:expr, $token:expr, $body:expr) => {{
        let mut req = test::TestRequest::default()
            .method($method)
            .uri($path)
            .peer_addr($h.peer);
        if let Some(token) = $token {
            req = req.insert_header(("Authorization", format!("Bearer {token}")));
        }
        let body: Option<Value> = $body;
        if let Some(body) = body {
            req = req.set_json(body);
        }
        let resp: ServiceResponse = test::call_service(&$app, req.to_request()).await;
        let status = resp.status();
        let bytes = test::read_body(resp).await;
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) }))
        };
        (status, json)
    }};
}

const PASSWORD: &str = "a long enough password";

/// An MSP with tenants A and B, an admin for each and a viewer in A. Returns session tokens.
struct World {
    msp_admin: String,
    tenant_a: String,
    tenant_b: String,
    admin_a: String,
    admin_b: String,
    viewer_a: String,
}

async fn login(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = ServiceResponse,
        Error = actix_web::Error,
    >,
    h: &Harness,
    email: &str,
) -> String {
    let (status, body) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/login",
        None::<&str>,
        Some(json!({ "email": email, "password": PASSWORD }))
    );
    assert_eq!(status, StatusCode::OK, "login {email}: {body}");
    body["session_token"].as_str().unwrap().to_owned()
}

async fn world(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = ServiceResponse,
        Error = actix_web::Error,
    >,
    h: &Harness,
) -> World {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let admin_email = format!("root-{tag}@msp.example");
    patronus_controller::admin::create_msp(
        &h.state.db,
        &format!("MSP {tag}"),
        &admin_email,
        PASSWORD,
    )
    .await
    .expect("bootstrap");
    let msp_admin = login(app, h, &admin_email).await;
    let mut tenants = Vec::new();
    for slug in ["alpha", "bravo"] {
        let (status, body) = call!(
            app,
            h,
            Method::POST,
            "/api/v1/tenants",
            Some(&msp_admin),
            Some(json!({ "name": format!("Tenant {slug}"), "slug": slug }))
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
        tenants.push(body["id"].as_str().unwrap().to_owned());
    }
    let mut tokens = Vec::new();
    for (tenant, who, role) in [
        (&tenants[0], "admin-a", "tenant_admin"),
        (&tenants[1], "admin-b", "tenant_admin"),
        (&tenants[0], "viewer-a", "tenant_viewer"),
    ] {
        let email = format!("{who}-{tag}@example.com");
        let (status, body) = call!(
            app,
            h,
            Method::POST,
            &format!("/api/v1/tenants/{tenant}/operators"),
            Some(&msp_admin),
            Some(json!({ "email": email, "password": PASSWORD, "role": role }))
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
        tokens.push(login(app, h, &email).await);
    }
    World {
        msp_admin,
        tenant_a: tenants[0].clone(),
        tenant_b: tenants[1].clone(),
        admin_a: tokens[0].clone(),
        admin_b: tokens[1].clone(),
        viewer_a: tokens[2].clone(),
    }
}

fn site_body(name: &str, lan: &str) -> Value {
    json!({
        "name": name,
        "region": "eu-west",
        "lan_prefixes": [lan],
        "uplinks": [
            { "name": "fiber", "address": "198.18.1.1", "interface_type": "fiber", "bandwidth_mbps": 1000, "cost_per_gb": 0.01 },
            { "name": "lte", "address": "198.18.2.1", "interface_type": "lte", "cost_per_gb": 0.1, "metered": true }
        ]
    })
}

fn voip_policy() -> Value {
    json!({
        "name": "VoIP",
        "kind": "routing",
        "priority": 200,
        "spec": {
            "match": { "protocol": "udp", "dst_ports": [{ "start": 5060, "end": 5061 }] },
            "app_class": "voip",
            "path_preference": { "kind": "lowest_latency" }
        }
    })
}

#[actix_web::test]
async fn login_refresh_and_logout() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("boss-{tag}@msp.example");
    patronus_controller::admin::create_msp(&h.state.db, &format!("MSP {tag}"), &email, PASSWORD)
        .await?;

    let (status, body) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/login",
        None::<&str>,
        Some(json!({ "email": email, "password": "wrong password here" }))
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unauthorized");
    let (status, unknown) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/login",
        None::<&str>,
        Some(json!({ "email": "nobody@nowhere.example", "password": PASSWORD }))
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        unknown["detail"], body["detail"],
        "unknown and wrong-password logins must look alike"
    );

    let (status, pair) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/login",
        None::<&str>,
        Some(json!({ "email": email.to_uppercase(), "password": PASSWORD }))
    );
    assert_eq!(status, StatusCode::OK, "{pair}");
    let session = pair["session_token"].as_str().unwrap().to_owned();
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(pair["operator"]["role"], "msp_admin");

    let (status, me) = call!(app, h, Method::GET, "/api/v1/auth/me", Some(&session), None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        me["label"], email,
        "the label is the stored e-mail, not what was typed"
    );

    let (status, next) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/refresh",
        None::<&str>,
        Some(json!({ "refresh_token": refresh }))
    );
    assert_eq!(status, StatusCode::OK, "{next}");
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/refresh",
        None::<&str>,
        Some(json!({ "refresh_token": refresh }))
    );
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a refresh token works once"
    );

    let new_session = next["session_token"].as_str().unwrap().to_owned();
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/logout",
        Some(&new_session),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/auth/me",
        Some(&new_session),
        None
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let (status, body) = call!(app, h, Method::GET, "/api/v1/sites", None::<&str>, None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["detail"].as_str().unwrap().contains("Bearer"));
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/sites",
        Some("garbage.token.here"),
        None
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn one_tenant_never_sees_another() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;

    let (status, site) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/sites",
        Some(&w.admin_a),
        Some(site_body("hq", "10.1.0.0/24"))
    );
    assert_eq!(status, StatusCode::CREATED, "{site}");
    let site_id = site["id"].as_str().unwrap().to_owned();
    assert_eq!(site["uplinks"].as_array().unwrap().len(), 2);
    assert_eq!(site["overlay_address"], "100.64.0.1/32");
    let (status, policy) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/policies",
        Some(&w.admin_a),
        Some(voip_policy())
    );
    assert_eq!(status, StatusCode::CREATED, "{policy}");
    let policy_id = policy["id"].as_str().unwrap().to_owned();

    let (status, token) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/api-tokens",
        Some(&w.admin_a),
        Some(json!({ "name": "ci", "role": "tenant_viewer" }))
    );
    assert_eq!(status, StatusCode::CREATED);
    let token_id = token["id"].as_str().unwrap().to_owned();
    let (_, operators) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/operators",
        Some(&w.admin_a),
        None
    );
    let operator_id = operators["items"][0]["id"].as_str().unwrap().to_owned();

    // Tenant B: every route to A's resources is 404, lists never show them.
    for (method, path) in [
        (Method::DELETE, format!("/api/v1/api-tokens/{token_id}")),
        (Method::GET, format!("/api/v1/operators/{operator_id}")),
        (Method::DELETE, format!("/api/v1/operators/{operator_id}")),
    ] {
        let (status, resp) = call!(app, h, method.clone(), &path, Some(&w.admin_b), None);
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {resp}");
    }
    let (_, their_tokens) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/api-tokens",
        Some(&w.admin_b),
        None
    );
    assert!(!their_tokens.to_string().contains(&token_id));
    let (_, their_operators) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/operators",
        Some(&w.admin_b),
        None
    );
    assert!(!their_operators.to_string().contains(&operator_id));
    for (method, path) in [
        (Method::GET, format!("/api/v1/sites/{site_id}")),
        (Method::PATCH, format!("/api/v1/sites/{site_id}")),
        (Method::DELETE, format!("/api/v1/sites/{site_id}")),
        (Method::GET, format!("/api/v1/policies/{policy_id}")),
        (Method::PUT, format!("/api/v1/policies/{policy_id}")),
        (Method::DELETE, format!("/api/v1/policies/{policy_id}")),
        (Method::GET, format!("/api/v1/tenants/{}/sites", w.tenant_a)),
        (Method::GET, format!("/api/v1/tenants/{}", w.tenant_a)),
    ] {
        let body = match method {
            Method::PATCH => Some(json!({ "name": "stolen" })),
            Method::PUT => Some(voip_policy()),
            _ => None,
        };
        let (status, resp) = call!(app, h, method.clone(), &path, Some(&w.admin_b), body);
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {resp}");
        assert_eq!(resp["error"], "not_found");
    }
    let (status, list) = call!(app, h, Method::GET, "/api/v1/sites", Some(&w.admin_b), None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let (_, list) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/policies",
        Some(&w.admin_b),
        None
    );
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let (_, audit) = call!(app, h, Method::GET, "/api/v1/audit", Some(&w.admin_b), None);
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["tenant_id"] == json!(w.tenant_b)),
        "{audit}"
    );
    // The refused update's audit row (sent with the update, pipelined) was rolled back.
    assert!(!audit.to_string().contains(policy_id.as_str()), "{audit}");

    // A's site is untouched, and A sees it.
    let (status, same) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/sites/{site_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same["name"], "hq");

    // The MSP admin reaches both, by path prefix or header, and must name one.
    let (status, body) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/sites",
        Some(&w.msp_admin),
        None
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "tenant_required");
    let (status, one) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/tenants/{}/sites/{site_id}", w.tenant_a),
        Some(&w.msp_admin),
        None
    );
    assert_eq!(
        status,
        StatusCode::OK,
        "an id route under the tenant prefix: {one}"
    );
    let (status, list) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/tenants/{}/sites", w.tenant_a),
        Some(&w.msp_admin),
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let req = test::TestRequest::get()
        .uri("/api/v1/sites")
        .peer_addr(h.peer)
        .insert_header(("Authorization", format!("Bearer {}", w.msp_admin)))
        .insert_header(("X-Patronus-Tenant", w.tenant_b.clone()))
        .to_request();
    let resp: Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(resp["items"].as_array().unwrap().len(), 0);
    let (_, tenants) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/tenants",
        Some(&w.msp_admin),
        None
    );
    assert_eq!(tenants["items"].as_array().unwrap().len(), 2);
    let (_, tenants) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/tenants",
        Some(&w.admin_a),
        None
    );
    assert_eq!(tenants["items"].as_array().unwrap().len(), 1);
    // A tenant that does not exist, or of another MSP, is 404 too.
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/tenants/{}/sites", uuid::Uuid::new_v4()),
        Some(&w.msp_admin),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn bad_input_gets_a_json_error_and_changes_nothing() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/sites",
        Some(&w.admin_a),
        Some(site_body("hq", "10.1.0.0/24"))
    );
    assert_eq!(status, StatusCode::CREATED);

    let mut reversed = voip_policy();
    reversed["spec"]["match"]["dst_ports"] = json!([{ "start": 9, "end": 1 }]);
    let mut misspelt = voip_policy();
    misspelt["spec"]["app_clas"] = json!("voip");
    let mut too_fast = voip_policy();
    too_fast["spec"]["probe_interval_ms"] = json!(5);
    let mut bad_kind = voip_policy();
    bad_kind["kind"] = json!("teleport");
    let cases: Vec<(&str, &str, Value, StatusCode, &str)> = vec![
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "x", "colour": "red" }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "region": "eu" }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "y", "lan_prefixes": ["10.1.0.1/24"] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "y", "lan_prefixes": ["10.1.0.0/25"] }),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "y", "lan_prefixes": ["not a prefix"] }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "hq" }),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "y", "listen_port_base": 80 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "POST",
            "/api/v1/sites",
            json!({ "name": "y", "uplinks": [{ "name": "a", "address": "198.18.0.1", "interface_type": "fiber", "cost_per_gb": -1.0 }] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "POST",
            "/api/v1/policies",
            reversed,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
        ),
        (
            "POST",
            "/api/v1/policies",
            misspelt,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
        ),
        (
            "POST",
            "/api/v1/policies",
            too_fast,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
        ),
        (
            "POST",
            "/api/v1/policies",
            bad_kind,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            "/api/v1/policies",
            json!({ "name": "p", "kind": "routing", "spec": {}, "site_ids": [uuid::Uuid::new_v4()] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
        ),
        (
            "GET",
            "/api/v1/sites?limit=0",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/sites?limit=5000",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/sites?cursor=zzz",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/sites?colour=red",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/sites/not-a-uuid",
            Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET",
            "/api/v1/nothing-here",
            Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/operators",
            json!({ "email": "weak@example.com", "password": "short", "role": "tenant_admin" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "weak_password",
        ),
        (
            "POST",
            "/api/v1/api-tokens",
            json!({ "name": "t", "role": "msp_admin" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
    ];
    let (_, sites_now) = call!(app, h, Method::GET, "/api/v1/sites", Some(&w.admin_a), None);
    let site_id = sites_now["items"][0]["id"].as_str().unwrap().to_owned();
    let (_, operators_now) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/operators",
        Some(&w.admin_a),
        None
    );
    let operator_id = operators_now["items"][0]["id"].as_str().unwrap().to_owned();
    let site_path = format!("/api/v1/sites/{site_id}");
    let operator_path = format!("/api/v1/operators/{operator_id}");
    let random_path_test = format!("/api/v1/paths/{}/test", uuid::Uuid::new_v4());
    let mut cases = cases;
    cases.extend([
        (
            "POST",
            "/api/v1/auth/login",
            json!({ "email": "a@b.c" }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            "/api/v1/auth/refresh",
            json!({ "refresh_token": "prt_forged" }),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "PATCH",
            site_path.as_str(),
            json!({ "colour": "red" }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "PATCH",
            site_path.as_str(),
            json!({ "region": "not a region!" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "PATCH",
            operator_path.as_str(),
            json!({ "shoe_size": 44 }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "PATCH",
            operator_path.as_str(),
            json!({ "password": "short" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "weak_password",
        ),
        (
            "PUT",
            "/api/v1/topology",
            json!({ "mode": "full_mesh", "teleport": true }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "POST",
            random_path_test.as_str(),
            json!({}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET",
            "/api/v1/paths?status=sideways",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/flows?site=not-a-uuid",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/api/v1/audit?limit=0",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "PATCH",
            "/api/v1/policies",
            json!({}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ]);
    let count = |v: &Value| v["items"].as_array().map_or(0, Vec::len);
    let (_, sites_before) = call!(app, h, Method::GET, "/api/v1/sites", Some(&w.admin_a), None);
    let (_, policies_before) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/policies",
        Some(&w.admin_a),
        None
    );
    for (method, path, body, expected, code) in cases {
        let body = (!body.is_null()).then_some(body);
        let (status, resp) = call!(
            app,
            h,
            Method::from_bytes(method.as_bytes()).unwrap(),
            path,
            Some(&w.admin_a),
            body.clone()
        );
        assert_eq!(status, expected, "{method} {path} {body:?}: {resp}");
        assert_eq!(resp["error"], code, "{method} {path}: {resp}");
        assert!(
            resp["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{resp}"
        );
    }
    // Malformed JSON, and the wrong content type.
    let req = test::TestRequest::post()
        .uri("/api/v1/sites")
        .peer_addr(h.peer)
        .insert_header(("Authorization", format!("Bearer {}", w.admin_a)))
        .insert_header(("Content-Type", "application/json"))
        .set_payload("{\"name\": ")
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (_, sites_after) = call!(app, h, Method::GET, "/api/v1/sites", Some(&w.admin_a), None);
    let (_, policies_after) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/policies",
        Some(&w.admin_a),
        None
    );
    assert_eq!(count(&sites_before), count(&sites_after));
    assert_eq!(count(&policies_before), count(&policies_after));
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn viewers_read_but_cannot_write() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/sites",
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    // The application catalog is readable by anyone signed in, and says what `voip` matches.
    let (status, catalog) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/app-classes",
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::OK, "{catalog}");
    let voip = catalog
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["class"] == "voip"))
        .expect("voip in the catalog");
    assert!(
        voip["signatures"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["protocol"] == "udp"
                && s["dst_ports"]
                    .as_array()
                    .is_some_and(|p| p.contains(&json!([16384, 32767]))))),
        "{voip}"
    );
    for (method, path, body) in [
        (Method::POST, "/api/v1/sites", site_body("v", "10.9.0.0/24")),
        (Method::POST, "/api/v1/policies", voip_policy()),
        (
            Method::POST,
            "/api/v1/api-tokens",
            json!({ "name": "t", "role": "tenant_viewer" }),
        ),
        (
            Method::POST,
            "/api/v1/operators",
            json!({ "email": "x@example.com", "password": PASSWORD, "role": "tenant_admin" }),
        ),
    ] {
        let (status, resp) = call!(app, h, method, path, Some(&w.viewer_a), Some(body));
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {resp}");
        assert_eq!(resp["error"], "forbidden");
    }
    // Tenant admins cannot create tenants or MSP admins.
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/tenants",
        Some(&w.admin_a),
        Some(json!({ "name": "x", "slug": "x" }))
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn api_tokens_work_until_revoked_and_changes_are_audited() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let (status, created) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/api-tokens",
        Some(&w.admin_a),
        Some(json!({ "name": "ci", "role": "tenant_admin", "expires_in_days": 30 }))
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_owned();
    let token_id = created["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pat_"));

    let (status, site) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/sites",
        Some(&secret),
        Some(site_body("branch", "10.2.0.0/24"))
    );
    assert_eq!(status, StatusCode::CREATED, "{site}");
    let (status, listed) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/api-tokens",
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is shown once only"
    );
    // A token cannot mint tokens, nor see another tenant.
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/api-tokens",
        Some(&secret),
        Some(json!({ "name": "x", "role": "tenant_viewer" }))
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/tenants/{}/sites", w.tenant_b),
        Some(&secret),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/api-tokens/{token_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call!(app, h, Method::GET, "/api/v1/sites", Some(&secret), None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, audit) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/audit?limit=100",
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "api_token.create",
        "site.create",
        "api_token.revoke",
        "operator.create",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    let site_entry = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "site.create")
        .unwrap();
    assert_eq!(site_entry["actor_kind"], "api_token");
    assert_eq!(site_entry["actor_label"], "ci");
    assert!(site_entry["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn login_attempts_are_rate_limited() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let email = format!("target-{}@example.com", uuid::Uuid::new_v4().simple());
    let limit = h.state.auth.login_per_minute_per_account;
    let mut limited = None;
    for attempt in 0..=limit + 1 {
        let req = test::TestRequest::post()
            .uri("/api/v1/auth/login")
            .peer_addr(h.peer)
            .set_json(json!({ "email": email, "password": "wrong password guess" }))
            .to_request();
        let resp = test::call_service(&app, req).await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry = resp
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            assert!(
                retry.is_some_and(|s| (1..=60).contains(&s)),
                "Retry-After: {retry:?}"
            );
            let body: Value = test::read_body_json(resp).await;
            assert_eq!(body["error"], "rate_limited");
            limited = Some(attempt);
            break;
        }
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        limited,
        Some(limit),
        "the attempt after {limit} failures is refused"
    );
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn topology_paths_metrics_and_flows() -> anyhow::Result<()> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let mut ids = Vec::new();
    for (name, lan) in [("hq", "10.1.0.0/24"), ("branch", "10.2.0.0/24")] {
        let (status, site) = call!(
            app,
            h,
            Method::POST,
            "/api/v1/sites",
            Some(&w.admin_a),
            Some(site_body(name, lan))
        );
        assert_eq!(status, StatusCode::CREATED, "{site}");
        ids.push(site["id"].as_str().unwrap().to_owned());
    }
    let (status, graph) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/topology",
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::OK, "{graph}");
    assert_eq!(graph["nodes"].as_array().unwrap().len(), 2);
    assert!(graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["reason"] == "not enrolled"));
    assert_eq!(graph["edges"].as_array().unwrap().len(), 0);

    // Bad settings are refused; the viewer cannot change them.
    let (status, body) = call!(
        app,
        h,
        Method::PUT,
        "/api/v1/topology",
        Some(&w.admin_a),
        Some(json!({ "mode": "full_mesh", "max_peers": 0 }))
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "invalid_topology");
    let (status, _) = call!(
        app,
        h,
        Method::PUT,
        "/api/v1/topology",
        Some(&w.admin_a),
        Some(json!({ "mode": "star" }))
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call!(
        app,
        h,
        Method::PUT,
        "/api/v1/topology",
        Some(&w.viewer_a),
        Some(json!({ "mode": "full_mesh" }))
    );
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Enrol both sites (keys as enrollment will set them) and publish: paths appear.
    let mut owner = AsyncPgConnection::establish(&h.database.owner_url).await?;
    for (i, id) in ids.iter().enumerate() {
        let key = patronus_proto::WgPublicKey([i as u8 + 1; 32]).to_base64();
        owner
            .batch_execute(&format!(
                "UPDATE sites SET wg_public_key = '{key}', status = 'active' WHERE id = '{id}'"
            ))
            .await?;
    }
    let tenant = patronus_proto::TenantId(w.tenant_a.parse()?);
    let bucket = h.state.tenant_nats(tenant).await?.intents;
    let outcome = patronus_controller::intents::publish::publish_tenant(
        &h.state.db,
        &bucket,
        tenant,
        &h.state.probe_secret,
    )
    .await?;
    assert_eq!(outcome.published.len(), 2);
    let (_, graph) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/topology",
        Some(&w.admin_a),
        None
    );
    assert_eq!(graph["edges"].as_array().unwrap().len(), 1, "{graph}");
    assert_eq!(graph["edges"][0]["paths"].as_array().unwrap().len(), 4);
    let (status, paths) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths?site={}", ids[0]),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        paths["items"].as_array().unwrap().len(),
        8,
        "both directions of 2×2 uplinks"
    );
    let path_id = paths["items"][0]["id"].as_str().unwrap().to_owned();
    let (status, path) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert!(path["src_uplink_name"].is_string());
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}"),
        Some(&w.admin_b),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Metrics history: raw and bucketed.
    owner
        .batch_execute(&format!(
            "INSERT INTO path_metrics (tenant_id, path_id, measured_at, latency_ms, jitter_ms, packet_loss_pct, score, status)
             SELECT '{}', '{path_id}', now() - make_interval(secs => g), 20 + g % 10, 1, 0, 90, 'up'
             FROM generate_series(1, 120) g",
            w.tenant_a
        ))
        .await?;
    let (status, raw) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}/metrics"),
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::OK, "{raw}");
    assert_eq!(raw["points"].as_array().unwrap().len(), 120);
    let (_, bucketed) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}/metrics?step=60"),
        Some(&w.viewer_a),
        None
    );
    let points = bucketed["points"].as_array().unwrap();
    assert!((2..=3).contains(&points.len()), "{bucketed}");
    assert_eq!(
        points
            .iter()
            .map(|p| p["samples"].as_i64().unwrap())
            .sum::<i64>(),
        120
    );
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}/metrics?step=0"),
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/paths/{path_id}/metrics?from=2020-01-01T00:00:00Z"),
        Some(&w.viewer_a),
        None
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // No edge is running: the on-demand test says so.
    let (status, body) = call!(
        app,
        h,
        Method::POST,
        &format!("/api/v1/paths/{path_id}/test"),
        Some(&w.admin_a),
        Some(json!({ "duration_s": 1 }))
    );
    assert!(
        matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        "{status} {body}"
    );
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        &format!("/api/v1/paths/{path_id}/test"),
        Some(&w.admin_a),
        Some(json!({ "duration_s": 600 }))
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, flows) = call!(app, h, Method::GET, "/api/v1/flows", Some(&w.admin_a), None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(flows["items"].as_array().unwrap().len(), 0);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/flows/{}", uuid::Uuid::new_v4()),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/topology/optimize",
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::ACCEPTED);

    let req = test::TestRequest::get()
        .uri("/metrics")
        .peer_addr(h.peer)
        .to_request();
    let text = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec())?;
    assert!(text.contains("patronus_db_pool_connections"), "{text}");
    drop(owner);
    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn every_resource_goes_through_create_read_update_delete() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;

    // Tenant: rename, set topology, and (MSP admin) delete a third tenant.
    let (status, tenant) = call!(
        app,
        h,
        Method::PATCH,
        &format!("/api/v1/tenants/{}", w.tenant_a),
        Some(&w.admin_a),
        Some(json!({ "name": "Alpha Corp", "topology": { "mode": "full_mesh", "max_peers": 10 } }))
    );
    assert_eq!(status, StatusCode::OK, "{tenant}");
    assert_eq!(tenant["name"], "Alpha Corp");
    assert_eq!(tenant["topology"]["max_peers"], 10);
    let (status, _) = call!(
        app,
        h,
        Method::PATCH,
        &format!("/api/v1/tenants/{}", w.tenant_a),
        Some(&w.admin_a),
        Some(json!({ "topology": { "mode": "ring" } }))
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, extra) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/tenants",
        Some(&w.msp_admin),
        Some(json!({ "name": "Gamma", "slug": "gamma" }))
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/tenants",
        Some(&w.msp_admin),
        Some(json!({ "name": "Gamma again", "slug": "gamma" }))
    );
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/tenants",
        Some(&w.msp_admin),
        Some(json!({ "name": "Bad", "slug": "Bad Slug" }))
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let gamma = extra["id"].as_str().unwrap().to_owned();
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/tenants/{gamma}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a tenant admin cannot name another tenant"
    );
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/tenants/{gamma}"),
        Some(&w.msp_admin),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/tenants/{gamma}"),
        Some(&w.msp_admin),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Site: create, list with filters, patch, delete.
    let (_, site) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/sites",
        Some(&w.admin_a),
        Some(site_body("hq", "10.1.0.0/24"))
    );
    let site_id = site["id"].as_str().unwrap().to_owned();
    let (status, patched) = call!(
        app,
        h,
        Method::PATCH,
        &format!("/api/v1/sites/{site_id}"),
        Some(&w.admin_a),
        Some(
            json!({ "name": "head office", "role": "hub", "region": "", "lan_prefixes": ["10.1.0.0/23"] })
        )
    );
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "head office");
    assert_eq!(patched["role"], "hub");
    assert!(patched["region"].is_null());
    assert_eq!(patched["lan_prefixes"], json!(["10.1.0.0/23"]));
    let (_, pending) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/sites?status=pending&limit=1",
        Some(&w.admin_a),
        None
    );
    assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/sites?status=exploded",
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Pagination walks every site once.
    for i in 0..4 {
        let (status, _) = call!(
            app,
            h,
            Method::POST,
            "/api/v1/sites",
            Some(&w.admin_a),
            Some(json!({ "name": format!("branch{i}") }))
        );
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/sites?limit=2&cursor={c}"),
            None => "/api/v1/sites?limit=2".into(),
        };
        let (status, page) = call!(app, h, Method::GET, &path, Some(&w.admin_a), None);
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (5, 5), "{seen:?}");
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/sites/{site_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/sites/{site_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/sites/{site_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Policy: create, replace, filter by kind, delete.
    let (_, policy) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/policies",
        Some(&w.admin_a),
        Some(voip_policy())
    );
    let policy_id = policy["id"].as_str().unwrap().to_owned();
    let mut replaced = voip_policy();
    replaced["priority"] = json!(300);
    replaced["enabled"] = json!(false);
    let (status, body) = call!(
        app,
        h,
        Method::PUT,
        &format!("/api/v1/policies/{policy_id}"),
        Some(&w.admin_a),
        Some(replaced)
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["priority"].as_i64(), body["enabled"].as_bool()),
        (Some(300), Some(false))
    );
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/policies",
        Some(&w.admin_a),
        Some(
            json!({ "name": "qos", "kind": "qos", "priority": 46, "spec": { "classes": ["voip"], "dscp": 46 } })
        )
    );
    assert_eq!(status, StatusCode::CREATED);
    let (_, routing) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/policies?kind=routing",
        Some(&w.admin_a),
        None
    );
    assert_eq!(routing["items"].as_array().unwrap().len(), 1);
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/policies/{policy_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/policies/{policy_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Operator: list, update (role, password, disable), delete; disabled accounts cannot log in.
    let email = format!("temp-{}@example.com", uuid::Uuid::new_v4().simple());
    let (_, operator) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/operators",
        Some(&w.admin_a),
        Some(json!({ "email": email, "password": PASSWORD, "role": "tenant_viewer" }))
    );
    let operator_id = operator["id"].as_str().unwrap().to_owned();
    let (_, list) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/operators",
        Some(&w.admin_a),
        None
    );
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["id"] == json!(operator_id)));
    assert!(
        !list.to_string().contains("argon2"),
        "password hashes never leave the controller"
    );
    let (status, updated) = call!(
        app,
        h,
        Method::PATCH,
        &format!("/api/v1/operators/{operator_id}"),
        Some(&w.admin_a),
        Some(json!({ "role": "tenant_admin", "disabled": true }))
    );
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["role"], "tenant_admin");
    let (status, _) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/auth/login",
        None::<&str>,
        Some(json!({ "email": email, "password": PASSWORD }))
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call!(
        app,
        h,
        Method::PATCH,
        &format!("/api/v1/operators/{operator_id}"),
        Some(&w.admin_a),
        Some(json!({ "role": "msp_admin" }))
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/operators/{operator_id}"),
        Some(&w.admin_b),
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call!(
        app,
        h,
        Method::DELETE,
        &format!("/api/v1/operators/{operator_id}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, audit) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/audit?action=operator.delete",
        Some(&w.admin_a),
        None
    );
    assert_eq!(audit["items"].as_array().unwrap().len(), 1);

    drop(app);
    h.finish().await
}

#[actix_web::test]
async fn the_openapi_document_describes_exactly_what_is_served() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let req = test::TestRequest::get()
        .uri("/api/v1/openapi.json")
        .peer_addr(h.peer)
        .to_request();
    let doc: Value = test::call_and_read_body_json(&app, req).await;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for expected in [
        "/api/v1/auth/login",
        "/api/v1/tenants",
        "/api/v1/tenants/{tenant}",
        "/api/v1/operators/{id}",
        "/api/v1/api-tokens",
        "/api/v1/sites",
        "/api/v1/sites/{id}",
        "/api/v1/policies/{id}",
        "/api/v1/paths/{id}/metrics",
        "/api/v1/paths/{id}/test",
        "/api/v1/flows",
        "/api/v1/topology/optimize",
        "/api/v1/audit",
        "/api/v1/app-classes",
    ] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Every documented operation is served: none falls through to the API's catch-all.
    let mut operation_ids = std::collections::BTreeSet::new();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(
                operation_ids.insert(id.clone()),
                "duplicate operationId {id}"
            );
            let concrete = path
                .replace("{tenant}", &w.tenant_a)
                .replace("{id}", &uuid::Uuid::new_v4().to_string());
            let (status, body) = call!(
                app,
                h,
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                &concrete,
                Some(&w.msp_admin),
                Some(json!({}))
            );
            let caught_all = body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("endpoint (or method)"));
            assert!(
                !caught_all && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
    assert!(operations >= 35, "only {operations} operations documented");
    drop(app);
    h.finish().await
}

/// A portal request with `cookies`; returns status, headers and the body as text.
macro_rules! page {
    ($app:expr, $h:expr, $method:expr, $path:expr, $cookies:expr, $form:expr) => {{
        let mut req = test::TestRequest::default()
            .method($method)
            .uri($path)
            .peer_addr($h.peer);
        for (name, value) in $cookies {
            req = req.cookie(actix_web::cookie::Cookie::new(
                name.to_string(),
                value.to_string(),
            ));
        }
        let form: Option<Vec<(&str, String)>> = $form;
        if let Some(form) = form {
            req = req.set_form(form);
        }
        let resp: ServiceResponse = test::call_service(&$app, req.to_request()).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = test::read_body(resp).await;
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }};
}

/// The first CSRF token of a page's forms.
fn csrf_of(html: &str) -> String {
    let start = html
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + 19;
    html[start..start + html[start..].find('"').expect("end of the token")].to_owned()
}

fn set_cookie<'a>(headers: &'a actix_web::http::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get_all(actix_web::http::header::SET_COOKIE)
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie set"))
}

#[actix_web::test]
async fn the_portal_signs_in_scopes_by_tenant_checks_forms_and_escapes() -> anyhow::Result<()> {
    let h = harness().await?;
    let app = app!(h);
    let w = world(&app, &h).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("portal-{tag}@example.com");
    let (status, body) = call!(
        app,
        h,
        Method::POST,
        &format!("/api/v1/tenants/{}/operators", w.tenant_a),
        Some(&w.msp_admin),
        Some(json!({ "email": email, "password": PASSWORD, "role": "tenant_admin" }))
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call!(
        app,
        h,
        Method::POST,
        "/api/v1/sites",
        Some(&w.admin_a),
        Some(site_body("<script>alert(1)</script>", "10.77.0.0/24"))
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let none: [(&str, &str); 0] = [];

    // Signed out: every page sends to the sign-in form.
    let (status, headers, _) = page!(
        app,
        h,
        Method::GET,
        &format!("/portal/t/{}/", w.tenant_a),
        none,
        None
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers.get("location").unwrap(), "/portal/login");

    // Sign-in: a form token bound to a cookie, a wrong password said plainly, then a session
    // cookie that scripts cannot read and other sites cannot send.
    let (status, headers, html) = page!(app, h, Method::GET, "/portal/login", none, None);
    assert_eq!(status, StatusCode::OK);
    let login_cookie = set_cookie(&headers, "patronus_login");
    let login_secret = login_cookie["patronus_login=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let csrf = csrf_of(&html);
    let form = |password: &str, csrf: &str| {
        Some(vec![
            ("csrf", csrf.to_owned()),
            ("email", email.clone()),
            ("password", password.to_owned()),
        ])
    };
    let login_cookies = [("patronus_login", login_secret.as_str())];
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        "/portal/login",
        login_cookies,
        form("wrong password!", &csrf)
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        html.contains("form-error") && html.contains("wrong e-mail or password"),
        "{html}"
    );
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        "/portal/login",
        login_cookies,
        form(PASSWORD, "forged")
    );
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a sign-in form from elsewhere"
    );
    let (status, headers, _) = page!(
        app,
        h,
        Method::POST,
        "/portal/login",
        login_cookies,
        form(PASSWORD, &csrf)
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    let session = set_cookie(&headers, "patronus_session");
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(
            session.contains(flag),
            "session cookie without {flag}: {session}"
        );
    }
    let token = session["patronus_session=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let me = [("patronus_session", token.as_str())];

    let (status, headers, _) = page!(app, h, Method::GET, "/portal/", me, None);
    assert_eq!(status, StatusCode::SEE_OTHER);
    let overview_url = format!("/portal/t/{}/", w.tenant_a);
    assert_eq!(headers.get("location").unwrap(), overview_url.as_str());
    let (status, headers, html) = page!(app, h, Method::GET, &overview_url, me, None);
    assert_eq!(status, StatusCode::OK, "{html}");
    let csp = headers.get("content-security-policy").unwrap().to_str()?;
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(headers.get("x-frame-options").unwrap(), "DENY");
    assert!(html.contains(r#"<table id="sites">"#));
    assert!(
        html.contains("&#60;script&#62;alert(1)") && !html.contains("<script>alert(1)"),
        "a site's name must show as text: {html}"
    );
    for nav in ["overview", "topology", "policies", "onboarding", "events"] {
        let (status, _, body) = page!(
            app,
            h,
            Method::GET,
            &format!(
                "/portal/t/{}/{}",
                w.tenant_a,
                if nav == "overview" { "" } else { nav }
            ),
            me,
            None
        );
        assert_eq!(status, StatusCode::OK, "{nav}: {body}");
        assert!(body.contains(&format!(r#"data-nav="{nav}""#)));
    }

    // Another tenant's pages do not exist for this operator.
    let (status, _, html) = page!(
        app,
        h,
        Method::GET,
        &format!("/portal/t/{}/", w.tenant_b),
        me,
        None
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(html.contains(r#"id="not-found""#));

    // Onboarding: a forged form is refused; the real one shows the command once.
    let onboarding = format!("/portal/t/{}/onboarding", w.tenant_a);
    let (_, _, html) = page!(app, h, Method::GET, &onboarding, me, None);
    assert!(html.contains("data-edit"));
    let csrf = csrf_of(&html);
    let token_form = |csrf: &str| {
        Some(vec![
            ("csrf", csrf.to_owned()),
            ("site_name", "branch-42".to_owned()),
            ("lan_prefixes", "10.42.0.0/24".to_owned()),
            ("expires_in_hours", "2".to_owned()),
        ])
    };
    let (status, _, html) = page!(app, h, Method::POST, &onboarding, me, token_form("forged"));
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains(r#"id="forbidden""#));
    let (status, _, html) = page!(app, h, Method::POST, &onboarding, me, token_form(&csrf));
    assert_eq!(status, StatusCode::CREATED, "{html}");
    assert!(
        html.contains(r#"<pre id="enroll-command">patronus-edge enroll --controller"#),
        "{html}"
    );
    assert!(
        html.contains("patronus_edge_enrollment_token:") && html.contains(r#"id="token-expiry""#)
    );

    // A viewer sees no edit controls, and its own valid form is refused anyway.
    let viewer = [("patronus_session", w.viewer_a.as_str())];
    let (status, _, html) = page!(app, h, Method::GET, &onboarding, viewer, None);
    assert_eq!(status, StatusCode::OK);
    assert!(!html.contains("data-edit"), "a viewer got edit controls");
    let viewer_csrf = csrf_of(&html);
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        &onboarding,
        viewer,
        token_form(&viewer_csrf)
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains(r#"id="forbidden""#));

    // Policies: a field the API refuses is named beside the field; a good form creates the
    // policy; it can be disabled and moved up.
    let policies_url = format!("/portal/t/{}/policies", w.tenant_a);
    let (_, _, html) = page!(
        app,
        h,
        Method::GET,
        &format!("{policies_url}/new"),
        me,
        None
    );
    let csrf = csrf_of(&html);
    let policy_form = |ports: &str, probe: &str, name: &str| {
        Some(vec![
            ("csrf", csrf.clone()),
            ("name", name.to_owned()),
            ("priority", "200".to_owned()),
            ("enabled", "on".to_owned()),
            ("app_class", "voip".to_owned()),
            ("protocol", "udp".to_owned()),
            ("dst_ports", ports.to_owned()),
            ("path_preference", "lowest_latency".to_owned()),
            ("load_balancing", "active_backup".to_owned()),
            ("probe_interval_ms", probe.to_owned()),
        ])
    };
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        &policies_url,
        me,
        policy_form("9-1", "", "VoIP")
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        html.contains(r#"data-field="dst_ports""#) && html.contains("above end"),
        "{html}"
    );
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        &policies_url,
        me,
        policy_form("5060", "5", "VoIP")
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html.contains(r#"data-field="probe_interval_ms""#), "{html}");
    for (name, priority) in [("VoIP", "5060"), ("Video", "3478")] {
        let (status, _, html) = page!(
            app,
            h,
            Method::POST,
            &policies_url,
            me,
            policy_form(priority, "20", name)
        );
        assert_eq!(status, StatusCode::SEE_OTHER, "{html}");
    }
    let (status, listed) = call!(
        app,
        h,
        Method::GET,
        "/api/v1/policies",
        Some(&w.admin_a),
        None
    );
    assert_eq!(status, StatusCode::OK);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    let id_of = |name: &str| {
        items
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let (voip, video) = (id_of("VoIP"), id_of("Video"));
    assert_eq!(items[0]["spec"]["probe_interval_ms"], 20);
    let (_, _, html) = page!(app, h, Method::GET, &policies_url, me, None);
    let csrf = Some(vec![("csrf", csrf_of(&html))]);
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        &format!("{policies_url}/{voip}/toggle"),
        me,
        csrf.clone()
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    // Equal priorities: the one listed second (by name: VoIP after Video) steps above.
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        &format!("{policies_url}/{voip}/up"),
        me,
        csrf.clone()
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, voip_now) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/policies/{voip}"),
        Some(&w.admin_a),
        None
    );
    let (_, video_now) = call!(
        app,
        h,
        Method::GET,
        &format!("/api/v1/policies/{video}"),
        Some(&w.admin_a),
        None
    );
    assert_eq!(voip_now["enabled"], false, "{voip_now}");
    assert_eq!(
        (
            voip_now["priority"].as_i64(),
            video_now["priority"].as_i64()
        ),
        (Some(201), Some(200))
    );
    let (status, _, html) = page!(app, h, Method::GET, &policies_url, viewer, None);
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("VoIP") && !html.contains("data-edit"),
        "a viewer got policy controls"
    );

    // The audit log filters by action; a malformed filter is refused.
    let events_url = format!("/portal/t/{}/events", w.tenant_a);
    let (status, _, html) = page!(
        app,
        h,
        Method::GET,
        &format!("{events_url}?action=policy.update"),
        me,
        None
    );
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("<td>policy.update</td>") && !html.contains("<td>policy.create</td>"),
        "{html}"
    );
    let (status, _, _) = page!(
        app,
        h,
        Method::GET,
        &format!("{events_url}?action=DROP%20TABLE"),
        me,
        None
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Malformed forms and queries get the portal's error page.
    let (_, _, html) = page!(app, h, Method::GET, &onboarding, me, None);
    let bad_form = Some(vec![
        ("csrf", csrf_of(&html)),
        ("site_name", "x".to_owned()),
        ("expires_in_hours", "soon".to_owned()),
    ]);
    let (status, _, html) = page!(app, h, Method::POST, &onboarding, me, bad_form);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains(r#"id="bad-request""#), "{html}");
    let (status, _, html) = page!(app, h, Method::GET, "/portal/switch?tenant=nope", me, None);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains(r#"id="bad-request""#), "{html}");

    // Admin: operators and API tokens. A weak password is refused with the API's reason; a
    // new viewer is listed; an API token is shown once, works, and stops working when revoked.
    let admin_url = format!("/portal/t/{}/admin", w.tenant_a);
    let (status, _, html) = page!(app, h, Method::GET, &admin_url, viewer, None);
    assert_eq!(status, StatusCode::FORBIDDEN, "a viewer on the admin page");
    assert!(html.contains(r#"id="forbidden""#));
    let (status, _, html) = page!(app, h, Method::GET, &admin_url, me, None);
    assert_eq!(status, StatusCode::OK, "{html}");
    let csrf = csrf_of(&html);
    let operator = |password: &str| {
        Some(vec![
            ("csrf", csrf.clone()),
            ("email", format!("new-{tag}@example.com")),
            ("display_name", "New Viewer".to_owned()),
            ("password", password.to_owned()),
            ("role", "tenant_viewer".to_owned()),
        ])
    };
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        &format!("{admin_url}/operators"),
        me,
        operator("short")
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html.contains("form-error"), "{html}");
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        &format!("{admin_url}/operators"),
        me,
        operator(PASSWORD)
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, html) = page!(app, h, Method::GET, &admin_url, me, None);
    assert!(html.contains(&format!("new-{tag}@example.com")));
    let (status, _, html) = page!(
        app,
        h,
        Method::POST,
        &format!("{admin_url}/api-tokens"),
        me,
        Some(vec![
            ("csrf", csrf.clone()),
            ("name", "ci".to_owned()),
            ("role", "tenant_viewer".to_owned()),
            ("expires_in_days", "30".to_owned()),
        ])
    );
    assert_eq!(status, StatusCode::CREATED, "{html}");
    let marker = r#"<pre id="api-token-secret">"#;
    let start = html.find(marker).expect("the secret, once") + marker.len();
    let secret = html[start..start + html[start..].find('<').unwrap()].to_owned();
    let (status, _) = call!(app, h, Method::GET, "/api/v1/sites", Some(&secret), None);
    assert_eq!(status, StatusCode::OK, "the new API token works");
    let (_, _, html) = page!(app, h, Method::GET, &admin_url, me, None);
    assert!(!html.contains(&secret), "the secret is shown only once");
    let id_start = html.find(r#"data-token-id=""#).unwrap() + 15;
    let token_id = &html[id_start..id_start + 36];
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        &format!("{admin_url}/api-tokens/{token_id}/revoke"),
        me,
        Some(vec![("csrf", csrf.clone())])
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _) = call!(app, h, Method::GET, "/api/v1/sites", Some(&secret), None);
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the revoked API token still works"
    );

    // Static assets are cached; signing out revokes the session itself.
    let (status, headers, _) = page!(app, h, Method::GET, "/portal/static/portal.js", none, None);
    assert_eq!(status, StatusCode::OK);
    assert!(headers
        .get("cache-control")
        .unwrap()
        .to_str()?
        .contains("immutable"));
    let (_, _, html) = page!(app, h, Method::GET, &overview_url, me, None);
    let (status, _, _) = page!(
        app,
        h,
        Method::POST,
        "/portal/logout",
        me,
        Some(vec![("csrf", csrf_of(&html))])
    );
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = page!(app, h, Method::GET, &overview_url, me, None);
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the revoked session still works"
    );
    drop(app);
    h.finish().await
}

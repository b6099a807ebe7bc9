//! The schema against the real PostgreSQL: migrations apply, revert and apply again, and
//! row-level security keeps every tenant-owned table's rows to their tenant.
//!
//! The tables are enumerated from the catalog, so a new table without RLS, without a
//! policy, or without fixture rows here fails these tests until it is covered.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use patronus_controller::db::{self, migrations, Scope};
use patronus_proto::TenantId;
use patronus_test_support::{TestDatabase, TestEnv};
use uuid::Uuid;

/// Tables that hold no tenant's rows, with the reason. Anything else must have a tenant key.
const MSP_LEVEL_TABLES: &[(&str, &str)] = &[("msps", "owned by an MSP, isolated per MSP")];

#[derive(diesel::QueryableByName, Debug)]
struct TableInfo {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Bool)]
    rls: bool,
    #[diesel(sql_type = Bool)]
    has_tenant_id: bool,
    #[diesel(sql_type = Bool)]
    is_partition: bool,
    #[diesel(sql_type = BigInt)]
    policies: i64,
}

async fn tables(conn: &mut AsyncPgConnection) -> anyhow::Result<Vec<TableInfo>> {
    Ok(diesel::sql_query(
        "SELECT c.relname::text AS name, c.relrowsecurity AS rls,
                EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
                    AS has_tenant_id,
                c.relispartition AS is_partition,
                (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
           AND c.relname <> '__diesel_schema_migrations'
         ORDER BY c.relname",
    )
    .load(conn)
    .await?)
}

#[derive(diesel::QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

async fn leftover_objects(conn: &mut AsyncPgConnection) -> anyhow::Result<Vec<String>> {
    let rows: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relname NOT LIKE '__diesel_schema_migrations%'
         UNION ALL
         SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public'
         UNION ALL
         SELECT t.typname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
           AND t.typname NOT LIKE '__diesel_schema_migrations%'",
    )
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_revert_and_apply_again() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;

    let applied = migrations::run_pending(&database.owner_url).await?;
    ensure!(
        applied.len() >= 4,
        "expected every migration to apply, got {applied:?}"
    );
    let mut conn = AsyncPgConnection::establish(&database.owner_url).await?;
    let first = tables(&mut conn).await?;
    ensure!(
        first.iter().any(|t| t.name == "path_metrics"),
        "path_metrics missing after up"
    );
    ensure!(
        migrations::pending(&database.owner_url).await?.is_empty(),
        "migrations still pending after up"
    );

    let reverted = migrations::revert_all(&database.owner_url).await?;
    ensure!(
        reverted.len() == applied.len(),
        "reverted {reverted:?}, applied {applied:?}"
    );
    let leftovers = leftover_objects(&mut conn).await?;
    ensure!(
        leftovers.is_empty(),
        "down migrations left objects behind: {leftovers:?}"
    );

    let again = migrations::run_pending(&database.owner_url).await?;
    ensure!(
        again == applied,
        "second up applied {again:?}, first applied {applied:?}"
    );
    let second = tables(&mut conn).await?;
    ensure!(
        first.iter().map(|t| &t.name).collect::<Vec<_>>()
            == second.iter().map(|t| &t.name).collect::<Vec<_>>(),
        "schema differs after up/down/up"
    );
    drop(conn);
    database.drop_now().await
}

/// Ids of one tenant's fixture rows.
struct Fixture {
    tenant: Uuid,
}

fn fixture_sql(msp: Uuid, tenant: Uuid, n: u8) -> String {
    let site_a = Uuid::new_v4();
    let site_b = Uuid::new_v4();
    let ep_a = Uuid::new_v4();
    let ep_b = Uuid::new_v4();
    let path = Uuid::new_v4();
    let policy = Uuid::new_v4();
    format!(
        "INSERT INTO operators (msp_id, tenant_id, email, password_hash, role)
             VALUES ('{msp}', '{tenant}', 'admin{n}@tenant{n}.example', 'not-a-real-hash', 'tenant_admin');
         INSERT INTO api_tokens (tenant_id, name, token_hash, role)
             VALUES ('{tenant}', 'ci', sha256('{tenant}'::bytea), 'tenant_viewer');
         INSERT INTO audit_log (msp_id, tenant_id, actor_kind, actor_label, action, target_kind)
             VALUES ('{msp}', '{tenant}', 'system', 'test', 'seed', 'tenant');
         INSERT INTO sites (id, tenant_id, name, overlay_address)
             VALUES ('{site_a}', '{tenant}', 'hq', '100.64.0.1'), ('{site_b}', '{tenant}', 'branch', '100.64.0.2');
         INSERT INTO endpoints (id, tenant_id, site_id, uplink_index, name, address)
             VALUES ('{ep_a}', '{tenant}', '{site_a}', 0, 'wan0', '198.18.{n}.1'),
                    ('{ep_b}', '{tenant}', '{site_b}', 0, 'wan0', '198.18.{n}.2');
         INSERT INTO paths (id, tenant_id, src_site_id, dst_site_id, src_endpoint_id, dst_endpoint_id)
             VALUES ('{path}', '{tenant}', '{site_a}', '{site_b}', '{ep_a}', '{ep_b}');
         INSERT INTO site_certificates (tenant_id, site_id, serial, subject, not_before, not_after, certificate_pem)
             VALUES ('{tenant}', '{site_a}', md5('{tenant}'), 'CN=hq', now(), now() + interval '1 day', 'pem');
         INSERT INTO enrollment_tokens (id, tenant_id, site_id, expires_at)
             VALUES (gen_random_uuid(), '{tenant}', '{site_b}', now() + interval '1 hour');
         INSERT INTO tenant_cas (tenant_id, certificate_pem, private_key_sealed, not_after)
             VALUES ('{tenant}', 'pem', decode(repeat('00', 64), 'hex'), now() + interval '10 years');
         INSERT INTO site_nats_users (public_key, tenant_id, site_id, expires_at)
             VALUES ('U' || repeat('A', 54) || chr(65 + {n}), '{tenant}', '{site_a}', now() + interval '1 day');
         INSERT INTO policies (id, tenant_id, name, kind, spec)
             VALUES ('{policy}', '{tenant}', 'voip', 'routing', '{{}}');
         INSERT INTO flows (tenant_id, site_id, src_ip, dst_ip, src_port, dst_port, protocol, app_class,
                            policy_id, path_id, started_at, last_packet_at)
             VALUES ('{tenant}', '{site_a}', '10.{n}.0.1', '10.{n}.1.1', 40000, 5060, 17, 'voip',
                     '{policy}', '{path}', now(), now());
         INSERT INTO path_metrics (tenant_id, path_id, measured_at, latency_ms, jitter_ms, packet_loss_pct, score, status)
             VALUES ('{tenant}', '{path}', now(), 12.5, 1.5, 0, 95, 'up');
         INSERT INTO site_intents (tenant_id, site_id, revision, digest)
             VALUES ('{tenant}', '{site_a}', nextval('intent_revision_seq'), sha256('{site_a}'::bytea));"
    )
}

#[derive(diesel::QueryableByName)]
struct Counts {
    #[diesel(sql_type = BigInt)]
    mine: i64,
    #[diesel(sql_type = BigInt)]
    theirs: i64,
    #[diesel(sql_type = BigInt)]
    total: i64,
}

fn is_permission_denied(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info) if info.message().contains("permission denied"))
}

fn key_column(table: &TableInfo) -> Option<&'static str> {
    if table.name == "tenants" {
        Some("id")
    } else if table.has_tenant_id {
        Some("tenant_id")
    } else {
        None
    }
}

/// Count `table`'s rows by tenant under `scope`.
async fn counts(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    table: &str,
    key: &str,
    mine: Uuid,
    theirs: Uuid,
) -> Result<Counts, DieselError> {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE {key} = '{mine}') AS mine,
                count(*) FILTER (WHERE {key} = '{theirs}') AS theirs,
                count(*) AS total FROM {table}"
    );
    db::in_scope(conn, scope, move |conn| {
        Box::pin(async move { diesel::sql_query(sql).get_result::<Counts>(conn).await })
    })
    .await
}

/// Run one statement under `scope`; rows affected, or the error.
async fn execute(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    sql: String,
) -> Result<usize, DieselError> {
    db::in_scope(conn, scope, move |conn| {
        Box::pin(async move { diesel::sql_query(sql).execute(conn).await })
    })
    .await
}

#[derive(diesel::QueryableByName)]
struct RoleInfo {
    #[diesel(sql_type = Bool)]
    rolsuper: bool,
    #[diesel(sql_type = Bool)]
    rolbypassrls: bool,
    #[diesel(sql_type = BigInt)]
    owned_tables: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tenant_owned_table_is_isolated_by_row_level_security() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    migrations::run_pending(&database.owner_url).await?;

    // Fixtures, written as the owner (RLS applies to every role but the owner; the fixtures
    // still go in under each tenant's scope, as the application would write them).
    let msp = Uuid::new_v4();
    let a = Fixture {
        tenant: Uuid::new_v4(),
    };
    let b = Fixture {
        tenant: Uuid::new_v4(),
    };
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    let msp_scope = Scope::Msp { msp, tenant: None };
    let setup = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'Test MSP');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES
             ('{}', '{msp}', 'Tenant A', 'tenant-a'), ('{}', '{msp}', 'Tenant B', 'tenant-b');",
        a.tenant, b.tenant
    );
    db::in_scope(&mut owner, msp_scope, move |conn| {
        Box::pin(async move { conn.batch_execute(&setup).await })
    })
    .await
    .context("creating MSP and tenants")?;
    for (fixture, n) in [(&a, 1u8), (&b, 2u8)] {
        let sql = fixture_sql(msp, fixture.tenant, n);
        let scope = Scope::Msp {
            msp,
            tenant: Some(TenantId(fixture.tenant)),
        };
        db::in_scope(&mut owner, scope, move |conn| {
            Box::pin(async move { conn.batch_execute(&sql).await })
        })
        .await
        .with_context(|| format!("writing fixtures of tenant {n}"))?;
    }

    // The application role can never bypass RLS and owns nothing.
    let mut app = AsyncPgConnection::establish(&database.app_url).await?;
    let role: RoleInfo = diesel::sql_query(
        "SELECT rolsuper, rolbypassrls,
                (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid) AS owned_tables
         FROM pg_roles r WHERE rolname = current_user",
    )
    .get_result(&mut app)
    .await?;
    ensure!(
        !role.rolsuper && !role.rolbypassrls && role.owned_tables == 0,
        "the application role must not be superuser, bypass RLS or own tables"
    );

    let scope_a = Scope::Tenant(TenantId(a.tenant));
    let scope_b = Scope::Tenant(TenantId(b.tenant));
    let mut failures = Vec::new();
    let mut checked = BTreeMap::new();
    let all = tables(&mut owner).await?;
    ensure!(all.len() >= 12, "catalog lists only {} tables", all.len());
    for table in &all {
        let name = table.name.as_str();
        if !table.rls {
            failures.push(format!("{name}: row-level security is not enabled"));
            continue;
        }
        if table.policies == 0 {
            failures.push(format!(
                "{name}: RLS is on but no policy exists (nothing would be readable)"
            ));
            continue;
        }
        let Some(key) = key_column(table) else {
            if !MSP_LEVEL_TABLES.iter().any(|(t, _)| *t == name) {
                failures.push(format!(
                    "{name}: has no tenant_id column and is not listed as an MSP-level table"
                ));
            }
            continue;
        };

        // As tenant A through the application role.
        match counts(&mut app, scope_a, name, key, a.tenant, b.tenant).await {
            Ok(c) => {
                if c.theirs != 0 || c.total != c.mine {
                    failures.push(format!(
                        "{name}: tenant A reads {} of tenant B's rows",
                        c.theirs
                    ));
                }
            }
            // Partitions are reached only through their parent.
            Err(e) if table.is_partition && is_permission_denied(&e) => {}
            Err(e) => failures.push(format!("{name}: select as tenant A failed: {e}")),
        }
        if table.is_partition {
            checked.insert(name.to_owned(), "partition: RLS on, no direct grant");
            continue;
        }

        // The fixtures must cover every table, or the checks below prove nothing.
        let before = counts(&mut owner, scope_b, name, key, b.tenant, a.tenant)
            .await
            .with_context(|| format!("counting {name} as owner"))?;
        if before.mine == 0 {
            failures.push(format!(
                "{name}: no fixture rows for tenant B; add some to fixture_sql"
            ));
            continue;
        }
        let mine_before = counts(&mut owner, scope_a, name, key, a.tenant, b.tenant).await?;
        if mine_before.mine == 0 {
            failures.push(format!(
                "{name}: no fixture rows for tenant A; add some to fixture_sql"
            ));
            continue;
        }

        for (verb, sql) in [
            (
                "update",
                format!(
                    "UPDATE {name} SET {key} = {key} WHERE {key} = '{}'",
                    b.tenant
                ),
            ),
            (
                "delete",
                format!("DELETE FROM {name} WHERE {key} = '{}'", b.tenant),
            ),
        ] {
            match execute(&mut app, scope_a, sql).await {
                Ok(0) => {}
                Ok(n) => failures.push(format!(
                    "{name}: tenant A could {verb} {n} of tenant B's rows"
                )),
                Err(e) if is_permission_denied(&e) => {}
                Err(e) => failures.push(format!("{name}: {verb} as tenant A failed oddly: {e}")),
            }
        }
        // Moving one's own rows to another tenant is refused by the policy's WITH CHECK.
        match execute(
            &mut app,
            scope_a,
            format!(
                "UPDATE {name} SET {key} = '{}' WHERE {key} = '{}'",
                b.tenant, a.tenant
            ),
        )
        .await
        {
            Ok(0) => failures.push(format!(
                "{name}: tenant A's own rows were not visible to update"
            )),
            Ok(n) => failures.push(format!("{name}: tenant A moved {n} rows to tenant B")),
            Err(_) => {}
        }

        let after = counts(&mut owner, scope_b, name, key, b.tenant, a.tenant).await?;
        if after.mine != before.mine {
            failures.push(format!(
                "{name}: tenant B had {} rows, now {}",
                before.mine, after.mine
            ));
        }
        checked.insert(name.to_owned(), "read/update/delete isolated");
    }

    // Without any scope, nothing is visible at all.
    for table in all.iter().filter(|t| !t.is_partition) {
        let sql = format!(
            "SELECT count(*) AS mine, 0::bigint AS theirs, 0::bigint AS total FROM {}",
            table.name
        );
        let c = app
            .transaction::<_, DieselError, _>(async |conn| {
                diesel::sql_query(sql).get_result::<Counts>(conn).await
            })
            .await?;
        if c.mine != 0 {
            failures.push(format!(
                "{}: {} rows visible with no tenant set",
                table.name, c.mine
            ));
        }
    }

    // Inserting a row for another tenant is refused.
    match execute(
        &mut app,
        scope_a,
        format!(
            "INSERT INTO sites (tenant_id, name) VALUES ('{}', 'intruder')",
            b.tenant
        ),
    )
    .await
    {
        Err(e) if e.to_string().contains("row-level security") => {}
        other => failures.push(format!(
            "inserting a site for tenant B as tenant A gave {other:?}"
        )),
    }

    // The MSP-level table is isolated per MSP.
    let other_msp = Scope::Msp {
        msp: Uuid::new_v4(),
        tenant: None,
    };
    let visible = execute(&mut app, other_msp, "SELECT 1 FROM msps".into()).await?;
    if visible != 0 {
        failures.push(format!("msps: another MSP sees {visible} rows"));
    }

    drop(app);
    drop(owner);
    database.drop_now().await?;
    if !failures.is_empty() {
        bail!("row-level security failures:\n  {}", failures.join("\n  "));
    }
    ensure!(
        checked.contains_key("sites") && checked.contains_key("path_metrics"),
        "checked: {checked:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_partitions_are_created_ahead_and_dropped_for_retention() -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        n: i32,
    }
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    migrations::run_pending(&database.owner_url).await?;
    let mut app = AsyncPgConnection::establish(&database.app_url).await?;
    // The migration created yesterday .. +7 days; asking again creates nothing new.
    let again: Count = diesel::sql_query(
        "SELECT patronus_ensure_path_metrics_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9) AS n",
    )
    .get_result(&mut app)
    .await?;
    ensure!(again.n == 0, "re-ensuring created {} partitions", again.n);
    let ahead: Count = diesel::sql_query(
        "SELECT patronus_ensure_path_metrics_partitions((now() AT TIME ZONE 'UTC')::date + 8, 2) AS n",
    )
    .get_result(&mut app)
    .await?;
    ensure!(ahead.n == 2, "expected 2 new partitions, got {}", ahead.n);
    // Retention drops whole days that ended before the cutoff: yesterday's partition only.
    let dropped: Count = diesel::sql_query(
        "SELECT patronus_drop_path_metrics_partitions_before((now() AT TIME ZONE 'UTC')::date) AS n",
    )
    .get_result(&mut app)
    .await?;
    ensure!(
        dropped.n == 1,
        "expected to drop 1 partition, dropped {}",
        dropped.n
    );
    // The application role cannot create tables itself.
    let denied = app.batch_execute("CREATE TABLE sneaky (id int)").await;
    ensure!(denied.is_err(), "the application role could create a table");
    drop(app);
    database.drop_now().await
}

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    value: String,
}

fn read_tenant_setting(
    conn: &mut AsyncPgConnection,
) -> db::ScopedWork<'_, Result<Setting, DieselError>> {
    Box::pin(async move {
        diesel::sql_query("SELECT current_setting('patronus.tenant_id') AS value")
            .get_result(conn)
            .await
    })
}

/// The tenant key as a statement inside `in_scope` (or `read_in_scope`) sees it.
async fn scoped_tenant_setting(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    read_only: bool,
) -> Result<String, DieselError> {
    let seen = if read_only {
        db::read_in_scope(conn, scope, read_tenant_setting).await?
    } else {
        db::in_scope(conn, scope, read_tenant_setting).await?
    };
    Ok(seen.value)
}

/// The tenant key outside any scope (empty when none is set).
async fn unscoped_tenant_setting(conn: &mut AsyncPgConnection) -> Result<String, DieselError> {
    let left: Setting = diesel::sql_query(
        "SELECT coalesce(current_setting('patronus.tenant_id', true), '') AS value",
    )
    .get_result(conn)
    .await?;
    Ok(left.value)
}

async fn backend_pid(conn: &mut AsyncPgConnection) -> anyhow::Result<i32> {
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let row: Pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result(conn)
        .await?;
    Ok(row.pid)
}

/// `in_scope` sends its BEGIN ahead of the work's first statement without waiting for it, so
/// it tracks the transaction itself: a scoped transaction cut off mid-way (a cancelled
/// request) must leave its connection marked broken, so the pool replaces it rather than hand
/// out a connection still inside another tenant's transaction; the scope is in force for the
/// work's first statement; nested scopes are refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_scoped_transaction_never_reaches_the_next_checkout() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    migrations::run_pending(&database.owner_url).await?;
    let pool = db::pool(&database.app_url, 1)?;
    let tenant = TenantId(Uuid::new_v4());
    let scope = Scope::Tenant(tenant);

    let mut conn = pool.get().await?;
    let cut_pid = backend_pid(&mut conn).await?;
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        db::in_scope(&mut conn, scope, |conn| {
            Box::pin(async move {
                // The first statement sees the scope the BEGIN set.
                let seen: Setting =
                    diesel::sql_query("SELECT current_setting('patronus.tenant_id') AS value")
                        .get_result(conn)
                        .await?;
                assert_eq!(seen.value, tenant.0.to_string());
                std::future::pending::<()>().await;
                Ok::<(), DieselError>(())
            })
        }),
    )
    .await;
    ensure!(cut.is_err(), "the work should have been cut off");
    drop(conn);

    let mut conn = pool.get().await?;
    let pid = backend_pid(&mut conn).await?;
    ensure!(
        pid != cut_pid,
        "the pool handed out again the connection whose transaction was cut off"
    );
    let left = unscoped_tenant_setting(&mut conn).await?;
    ensure!(left.is_empty(), "a scope leaked: {left}");

    let nested = db::in_scope(&mut conn, scope, move |conn| {
        Box::pin(async move {
            db::in_scope(conn, scope, |_| {
                Box::pin(async { Ok::<(), DieselError>(()) })
            })
            .await
        })
    })
    .await;
    ensure!(
        matches!(nested, Err(DieselError::AlreadyInTransaction)),
        "a nested scope must be refused: {nested:?}"
    );
    // The connection is usable after the refusal (the outer transaction rolled back).
    ensure!(scoped_tenant_setting(&mut conn, scope, false).await? == tenant.0.to_string());
    drop(conn);
    pool.close();
    database.drop_now().await
}

/// `read_in_scope`: the scope is in force, PostgreSQL refuses a write, and the COMMIT it does
/// not wait for still ends the transaction before the connection's next statement.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_scope_refuses_writes_and_ends_before_the_next_statement() -> anyhow::Result<()>
{
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    migrations::run_pending(&database.owner_url).await?;
    let mut conn = AsyncPgConnection::establish(&database.app_url).await?;
    let tenant = TenantId(Uuid::new_v4());
    let scope = Scope::Tenant(tenant);
    for _ in 0..3 {
        let seen: Setting = db::read_in_scope(&mut conn, scope, |conn| {
            Box::pin(async move {
                diesel::sql_query("SELECT current_setting('patronus.tenant_id') AS value")
                    .get_result(conn)
                    .await
            })
        })
        .await?;
        ensure!(seen.value == tenant.0.to_string());
        // Right behind the unawaited COMMIT: outside any transaction, no scope left.
        let left: Setting = diesel::sql_query(
            "SELECT coalesce(current_setting('patronus.tenant_id', true), '') AS value",
        )
        .get_result(&mut conn)
        .await?;
        ensure!(
            left.value.is_empty(),
            "still inside the read: {}",
            left.value
        );
    }
    let write = db::read_in_scope(&mut conn, scope, |conn| {
        Box::pin(async move {
            diesel::sql_query("UPDATE sites SET name = name")
                .execute(conn)
                .await
        })
    })
    .await;
    ensure!(
        matches!(&write, Err(e) if e.to_string().contains("read-only transaction")),
        "a write in a read-only scope must be refused: {write:?}"
    );
    // The refused write rolled back; the connection goes on.
    ensure!(scoped_tenant_setting(&mut conn, scope, false).await? == tenant.0.to_string());
    drop(conn);
    database.drop_now().await
}

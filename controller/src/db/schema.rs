//! Diesel table definitions, written to match `migrations/` (the migrations are the truth; the
//! integration tests exercise every table through these definitions).

diesel::table! {
    msps (id) {
        id -> Uuid,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    tenants (id) {
        id -> Uuid,
        msp_id -> Uuid,
        name -> Text,
        slug -> Text,
        overlay_network -> Cidr,
        topology -> Jsonb,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    operators (id) {
        id -> Uuid,
        msp_id -> Uuid,
        tenant_id -> Nullable<Uuid>,
        email -> Text,
        display_name -> Text,
        password_hash -> Text,
        role -> Text,
        disabled_at -> Nullable<Timestamptz>,
        last_login_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    api_tokens (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        name -> Text,
        token_hash -> Bytea,
        role -> Text,
        created_by -> Nullable<Uuid>,
        created_at -> Timestamptz,
        expires_at -> Nullable<Timestamptz>,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    audit_log (id) {
        id -> Int8,
        msp_id -> Uuid,
        tenant_id -> Nullable<Uuid>,
        at -> Timestamptz,
        actor_kind -> Text,
        actor_id -> Nullable<Uuid>,
        actor_label -> Text,
        action -> Text,
        target_kind -> Text,
        target_id -> Nullable<Text>,
        detail -> Jsonb,
        request_id -> Nullable<Text>,
        source_ip -> Nullable<Inet>,
    }
}

diesel::table! {
    sites (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        name -> Text,
        region -> Nullable<Text>,
        role -> Text,
        status -> Text,
        wg_public_key -> Nullable<Text>,
        overlay_address -> Nullable<Inet>,
        lan_prefixes -> Array<Cidr>,
        listen_port_base -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        enrolled_at -> Nullable<Timestamptz>,
        last_seen_at -> Nullable<Timestamptz>,
        wg_next_public_key -> Nullable<Text>,
        wg_next_submitted_at -> Nullable<Timestamptz>,
        wg_next_announce_revision -> Nullable<Int8>,
        wg_next_announced_at -> Nullable<Timestamptz>,
        wg_key_rotated_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    endpoints (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        site_id -> Uuid,
        uplink_index -> Int2,
        name -> Text,
        address -> Inet,
        interface_type -> Text,
        bandwidth_mbps -> Nullable<Int4>,
        cost_per_gb -> Float8,
        metered -> Bool,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    paths (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        src_site_id -> Uuid,
        dst_site_id -> Uuid,
        src_endpoint_id -> Uuid,
        dst_endpoint_id -> Uuid,
        wg_interface -> Nullable<Text>,
        status -> Text,
        score -> Nullable<Int2>,
        status_changed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        metrics_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    policies (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        name -> Text,
        kind -> Text,
        priority -> Int4,
        enabled -> Bool,
        spec -> Jsonb,
        site_ids -> Nullable<Array<Uuid>>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    flows (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        site_id -> Uuid,
        src_ip -> Inet,
        dst_ip -> Inet,
        src_port -> Int4,
        dst_port -> Int4,
        protocol -> Int2,
        app_class -> Text,
        policy_id -> Nullable<Uuid>,
        path_id -> Nullable<Uuid>,
        started_at -> Timestamptz,
        last_packet_at -> Timestamptz,
        bytes_tx -> Int8,
        bytes_rx -> Int8,
        packets_tx -> Int8,
        packets_rx -> Int8,
        reported_at -> Timestamptz,
    }
}

diesel::table! {
    path_metrics (path_id, measured_at) {
        tenant_id -> Uuid,
        path_id -> Uuid,
        measured_at -> Timestamptz,
        latency_ms -> Float4,
        jitter_ms -> Float4,
        packet_loss_pct -> Float4,
        bandwidth_mbps -> Nullable<Float4>,
        mtu -> Nullable<Int4>,
        score -> Int2,
        status -> Text,
        probes_sent -> Int4,
        probes_lost -> Int4,
    }
}

diesel::table! {
    path_metrics_1m (path_id, minute) {
        tenant_id -> Uuid,
        path_id -> Uuid,
        minute -> Timestamptz,
        samples -> Int4,
        latency_sum -> Float8,
        latency_min -> Float4,
        latency_max -> Float4,
        jitter_sum -> Float8,
        packet_loss_sum -> Float8,
        packet_loss_max -> Float4,
        bandwidth_sum -> Float8,
        bandwidth_samples -> Int4,
        mtu_min -> Nullable<Int4>,
        score_sum -> Int8,
        score_min -> Int2,
        down_samples -> Int4,
        probes_sent -> Int8,
        probes_lost -> Int8,
    }
}

diesel::table! {
    site_intents (site_id) {
        tenant_id -> Uuid,
        site_id -> Uuid,
        revision -> Int8,
        digest -> Bytea,
        published_at -> Timestamptz,
        applied_revision -> Nullable<Int8>,
        applied_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    enrollment_tokens (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        site_id -> Uuid,
        created_by -> Nullable<Uuid>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        redeemed_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        redeemed_from -> Nullable<Inet>,
    }
}

diesel::table! {
    site_certificates (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        site_id -> Nullable<Uuid>,
        serial -> Text,
        subject -> Text,
        not_before -> Timestamptz,
        not_after -> Timestamptz,
        certificate_pem -> Text,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
        revocation_reason -> Nullable<Text>,
    }
}

diesel::table! {
    tenant_cas (tenant_id) {
        tenant_id -> Uuid,
        certificate_pem -> Text,
        private_key_sealed -> Bytea,
        not_after -> Timestamptz,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    site_nats_users (public_key) {
        public_key -> Text,
        tenant_id -> Uuid,
        site_id -> Nullable<Uuid>,
        issued_at -> Timestamptz,
        expires_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(tenants -> msps (msp_id));
diesel::joinable!(endpoints -> sites (site_id));
diesel::joinable!(policies -> tenants (tenant_id));
diesel::allow_tables_to_appear_in_same_query!(
    msps,
    tenants,
    operators,
    api_tokens,
    audit_log,
    sites,
    endpoints,
    paths,
    policies,
    flows,
    path_metrics,
    path_metrics_1m,
    site_intents,
    enrollment_tokens,
    site_certificates,
    tenant_cas,
    site_nats_users,
);

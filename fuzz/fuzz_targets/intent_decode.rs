//! Fuzz the intent decoder (JSON, schema version, validation): never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patronus_proto::{codec, SiteIntent};

fuzz_target!(|data: &[u8]| {
    if let Ok(intent) = codec::decode::<SiteIntent>(data) {
        let _ = intent.content_digest();
    }
});

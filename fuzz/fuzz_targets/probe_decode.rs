//! Fuzz the binary path-probe decoder: any datagram must decode or give an error, never panic,
//! and whatever decodes must re-encode to the same bytes (for v1 headers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use patronus_proto::probe::{self, V1_HEADER_LEN};
use patronus_proto::ProbeKey;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = probe::decode(data) else {
        return;
    };
    let key = ProbeKey([0x42; 32]);
    let verified = decoded.verify(&key);
    if usize::from(data[3]) == V1_HEADER_LEN && data[2] == probe::VERSION {
        let signed = decoded.is_signed().then_some(&key);
        let again = decoded.packet.encode(signed).expect("a decoded probe re-encodes");
        // Padding content is not carried, so compare the header and length only.
        assert_eq!(again.len(), data.len());
        assert_eq!(&again[..2], &data[..2]);
        assert_eq!(&again[4..5], &data[4..5]);
        assert_eq!(&again[6..V1_HEADER_LEN], &data[6..V1_HEADER_LEN]);
        if verified.is_ok() {
            assert_eq!(again, data, "a verified probe re-encodes byte for byte");
        }
    }
});

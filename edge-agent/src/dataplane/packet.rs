//! Crafted packets and flow keys for test runs and benchmarks.

use super::abi::FlowKey;

/// An Ethernet + IPv4 + UDP frame with 32 bytes of payload (checksums left zero).
pub fn udp_ipv4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total: u16 = 20 + 8 + 32;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&(8u16 + 32).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&[0xab; 32]);
    p
}

/// IPv4 in the IPv4-mapped IPv6 form the flow key uses.
pub fn mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&a);
    m
}

pub fn flow_key_ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
) -> FlowKey {
    FlowKey {
        src_addr: mapped(src),
        dst_addr: mapped(dst),
        src_port: src_port.to_be(),
        dst_port: dst_port.to_be(),
        protocol,
        pad: [0; 3],
    }
}

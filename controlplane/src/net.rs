//! The host's own address, for the metadata when no address is configured.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

/// The address of the interface that routes outwards (found by connecting a UDP socket, which
/// sends nothing), else the loopback address.
pub fn host_ip() -> IpAddr {
    let probe = || -> std::io::Result<IpAddr> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((Ipv4Addr::new(8, 8, 8, 8), 80))?;
        Ok(s.local_addr()?.ip())
    };
    match probe() {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

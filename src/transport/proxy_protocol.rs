//! The PROXY protocol (v1 text, v2 binary) from an L4 balancer or TMG in front of seg, so
//! audit records and `X-Forwarded-For` carry the device's address.
//!
//! Accepted only from configured source networks, where it is also required; from anywhere
//! else the bytes are left to the TLS handshake, which refuses them. The header is read
//! exactly (v1 up to its CRLF, v2 by its length), never a byte of the TLS stream after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 address block accepted (addresses plus TLVs).
const V2_MAX: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed inside the PROXY header")]
    Truncated,
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("malformed PROXY v2 header")]
    BadV2,
}

/// The source a PROXY header reports: `None` for `UNKNOWN`/`LOCAL` (keep the peer address).
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 12];
    read(io, &mut start[..5]).await?;
    if &start[..5] == b"PROXY" {
        let mut line = start[..5].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyHeaderError::BadV1);
            }
            let mut byte = [0u8; 1];
            read(io, &mut byte).await?;
            line.push(byte[0]);
        }
        return parse_v1(&line);
    }
    read(io, &mut start[5..]).await?;
    if start != V2_SIGNATURE {
        return Err(ProxyHeaderError::NotProxy);
    }
    let mut fixed = [0u8; 4];
    read(io, &mut fixed).await?;
    let length = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
    if length > V2_MAX {
        return Err(ProxyHeaderError::BadV2);
    }
    let mut body = vec![0u8; length];
    read(io, &mut body).await?;
    parse_v2(fixed[0], fixed[1], &body)
}

async fn read<R: AsyncRead + Unpin>(io: &mut R, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    io.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyHeaderError::Truncated)
}

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN…\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyHeaderError::BadV1)?;
    let text = text.strip_suffix("\r\n").ok_or(ProxyHeaderError::BadV1)?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _destination, source_port, _destination_port] =>
        {
            let ip = IpAddr::from_str(source).map_err(|_| ProxyHeaderError::BadV1)?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::BadV1);
            }
            let port = source_port
                .parse::<u16>()
                .map_err(|_| ProxyHeaderError::BadV1)?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyHeaderError::BadV1),
    }
}

/// The v2 version/command byte, family byte and address block.
pub fn parse_v2(
    version_command: u8,
    family: u8,
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::BadV2);
    }
    match version_command & 0x0F {
        0 => return Ok(None), // LOCAL: the balancer's own health check.
        1 => {}
        _ => return Err(ProxyHeaderError::BadV2),
    }
    match family {
        // TCP over IPv4: src addr, dst addr, src port, dst port.
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        0x21 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // UNSPEC: no address to report.
        0x00 => Ok(None),
        _ => Err(ProxyHeaderError::BadV2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_v2_headers() {
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 443\r\n\x16\x03";
        assert_eq!(
            read_header(&mut v1).await,
            Ok(Some("203.0.113.7:50000".parse().unwrap()))
        );
        assert_eq!(v1, b"\x16\x03", "nothing after the header is consumed");
        let mut v1: &[u8] = b"PROXY TCP6 2001:db8::7 2001:db8::1 50000 443\r\n";
        assert_eq!(
            read_header(&mut v1).await,
            Ok(Some("[2001:db8::7]:50000".parse().unwrap()))
        );
        let mut unknown: &[u8] = b"PROXY UNKNOWN\r\n";
        assert_eq!(read_header(&mut unknown).await, Ok(None));

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xC3, 0x50, 0x01, 0xBB, 0x16,
        ]);
        let mut input: &[u8] = &v2;
        assert_eq!(
            read_header(&mut input).await,
            Ok(Some("198.51.100.9:50000".parse().unwrap()))
        );
        assert_eq!(input, [0x16]);
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(read_header(&mut &local[..]).await, Ok(None));
    }

    #[tokio::test]
    async fn malformed_headers_are_refused() {
        let rows: &[&[u8]] = &[
            b"PROXY TCP4 203.0.113.7 10.0.0.1 50000\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
        ];
        for row in rows {
            assert_eq!(
                read_header(&mut &row[..]).await,
                Err(ProxyHeaderError::BadV1),
                "{row:?}"
            );
        }
        // A bare LF never ends the line: the header runs on until refused.
        let bare_lf = [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(
            read_header(&mut &bare_lf[..]).await,
            Err(ProxyHeaderError::BadV1)
        );
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(
            read_header(&mut &long[..]).await,
            Err(ProxyHeaderError::BadV1)
        );
        assert_eq!(
            read_header(&mut &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00"[..]).await,
            Err(ProxyHeaderError::NotProxy)
        );
        assert_eq!(
            read_header(&mut &b"PRO"[..]).await,
            Err(ProxyHeaderError::Truncated)
        );
        let mut bad_version = V2_SIGNATURE.to_vec();
        bad_version.extend([0x11, 0x11, 0, 0]);
        assert_eq!(
            read_header(&mut &bad_version[..]).await,
            Err(ProxyHeaderError::BadV2)
        );
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(
            read_header(&mut &short[..]).await,
            Err(ProxyHeaderError::BadV2)
        );
    }
}

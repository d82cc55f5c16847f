//! TLS to a real `redis-server` (built with TLS) that requires client
//! certificates: certificates made here with rcgen, a CA file, and the
//! failures an operator meets (no client certificate, an unknown CA).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::redis::{RedisServer, free_port, require_redis};
use txgate::cache::{self, BackendKind, Config};
use txgate::engine::{Op, Reply};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).unwrap();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by the CA; plus an unrelated second CA.
fn pki() -> Pki {
    let dir =
        std::env::temp_dir().join(format!("txgate-tls-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert, Issuer::new(p, key))
    };
    let (ca_cert, issuer) = ca("txgate test CA");
    write(&dir, "ca.pem", &ca_cert.pem());
    let (other_ca, _) = ca("some other CA");
    write(&dir, "other-ca.pem", &other_ca.pem());
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
        ),
        ("client", vec!["txgate-client".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write(&dir, &format!("{name}.pem"), &cert.pem());
        write(&dir, &format!("{name}.key"), &key.serialize_pem());
    }
    Pki { dir }
}

fn tls_server(pki: &Pki) -> (RedisServer, u16) {
    require_redis();
    let tls_port = free_port();
    let server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        pki.path("server.pem").to_str().unwrap(),
        "--tls-key-file",
        pki.path("server.key").to_str().unwrap(),
        "--tls-ca-cert-file",
        pki.path("ca.pem").to_str().unwrap(),
        "--tls-auth-clients",
        "yes",
    ]);
    (server, tls_port)
}

fn config(port: u16, pki: &Pki) -> Config {
    Config {
        backend: BackendKind::Redis,
        redis_addr: Some(format!("127.0.0.1:{port}")),
        redis_tls: true,
        redis_tls_ca_file: Some(pki.path("ca.pem")),
        redis_tls_cert_file: Some(pki.path("client.pem")),
        redis_tls_key_file: Some(pki.path("client.key")),
        op_timeout: Duration::from_secs(2),
        dial_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

#[test]
fn tls_with_a_client_certificate_carries_every_op() {
    let pki = pki();
    let (_server, port) = tls_server(&pki);
    let e = support::engine(2, cache::open(&config(port, &pki)).expect("TLS opens"));
    for i in 0..50 {
        let key = format!("tls:{i}").into_bytes();
        let nx = Op::SetNx {
            key: key.clone(),
            val: key.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(&key, nx.clone()).unwrap(), Reply::SetNx(true));
        assert_eq!(e.op_blocking(&key, nx).unwrap(), Reply::SetNx(false));
        assert_eq!(
            e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
            Reply::Get(Some(key))
        );
    }
    let big = vec![7u8; 256 << 10];
    let key = b"tls:big".to_vec();
    let set = Op::Set {
        key: key.clone(),
        val: big.clone(),
        ttl: Duration::ZERO,
    };
    assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    assert_eq!(
        e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
        Reply::Get(Some(big))
    );
}

#[test]
fn tls_without_the_required_client_certificate_fails_closed() {
    let pki = pki();
    let (_server, port) = tls_server(&pki);
    let mut cfg = config(port, &pki);
    cfg.redis_tls_cert_file = None;
    cfg.redis_tls_key_file = None;
    let r = cache::open(&cfg);
    assert!(r.is_err(), "opened without a client certificate");
}

#[test]
fn tls_with_an_unknown_ca_fails_closed_naming_the_problem() {
    let pki = pki();
    let (_server, port) = tls_server(&pki);
    let mut cfg = config(port, &pki);
    cfg.redis_tls_ca_file = Some(pki.path("other-ca.pem"));
    let err = cache::open(&cfg)
        .expect_err("server certificate is not trusted")
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn plain_client_against_a_tls_port_is_an_error_not_a_hang() {
    let pki = pki();
    let (_server, port) = tls_server(&pki);
    let mut cfg = config(port, &pki);
    cfg.redis_tls = false;
    cfg.redis_tls_ca_file = None;
    cfg.redis_tls_cert_file = None;
    cfg.redis_tls_key_file = None;
    cfg.dial_timeout = Duration::from_millis(500);
    let t0 = std::time::Instant::now();
    assert!(cache::open(&cfg).is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_peer_trickling_a_tls_record_cannot_hold_open_past_the_dial_timeout() {
    let pki = pki();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Reads the ClientHello, then sends a record header promising 16 KiB
    // and its body a byte every 100 ms: each read is quick, the record
    // never completes (bounded: 5 s).
    let peer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = listener.accept().unwrap();
        let mut hello = [0u8; 4096];
        let _ = c.read(&mut hello);
        let _ = c.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if c.write_all(&[0x02]).is_err() {
                return;
            }
        }
    });
    let mut cfg = config(port, &pki);
    cfg.dial_timeout = Duration::from_millis(200);
    let t0 = std::time::Instant::now();
    let r = cache::open(&cfg);
    let took = t0.elapsed();
    assert!(
        matches!(r, Err(txgate::cache::CacheError::DialTimeout { .. })),
        "{:?}",
        r.err()
    );
    assert!(took < Duration::from_secs(2), "open took {took:?}");
    peer.join().unwrap();
}

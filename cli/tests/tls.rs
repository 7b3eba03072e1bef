//! TLS with a cluster CA, end to end: a CA, a server and a client certificate made with the
//! `openssl` command; the coordinator serves gRPC over TLS and requires client certificates; a
//! worker and the CLI with certificates get through, a client without one and a plain-text
//! client do not.

mod common;

use std::path::Path;
use std::process::Command;

use common::local::{spawn, wait_for};
use common::{s, scratch};

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A P-256 key and a certificate for `cn` signed by the CA, with `ext` (extensions).
fn issue(dir: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

#[test]
fn tls_with_client_certificates() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI is set but the openssl command is missing");
        eprintln!("SKIPPED: no openssl command to make the test certificates");
        return;
    }
    let d = scratch("tls");
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=liandan test CA",
        ],
    );
    issue(&d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
    issue(&d, "client", "liandan-worker", "extendedKeyUsage=clientAuth\n");
    let p = |f: &str| d.join(f).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));

    let addr_file = d.join("addr");
    let _coordinator = spawn(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--store",
            s(&d.join("store.db")),
            "--addr-file",
            s(&addr_file),
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--tls-ca",
            &ca,
        ],
        &d.join("coordinator.log"),
    );
    let addr = wait_for(20, "the coordinator's address file", || std::fs::read_to_string(&addr_file).ok().filter(|a| a.ends_with('\n'))).trim().to_string();
    assert!(addr.starts_with("https://127.0.0.1:"), "{addr}");

    let tls = ["--tls-ca", ca.as_str(), "--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let _worker = spawn(&[&["worker", "--coordinator", &addr, "--threads", "1"][..], &tls].concat(), &d.join("worker.log"));
    wait_for(30, "the TLS worker to register", || {
        let o = common::liandan(&[&["workers", "--coordinator", &addr][..], &tls].concat());
        String::from_utf8_lossy(&o.stdout).contains(" idle ").then_some(())
    });

    // Without a client certificate, and in plain text: refused.
    let o = common::liandan(&["workers", "--coordinator", &addr, "--tls-ca", &ca]);
    assert_eq!(o.status.code(), Some(1), "no client certificate: {}", String::from_utf8_lossy(&o.stdout));
    let plain = addr.replace("https://", "http://");
    let o = common::liandan(&["workers", "--coordinator", &plain]);
    assert_eq!(o.status.code(), Some(1), "plain text to a TLS port: {}", String::from_utf8_lossy(&o.stdout));
    // TLS files with an http:// address: a clear error before connecting.
    let o = common::liandan(&[&["workers", "--coordinator", &plain][..], &tls].concat());
    common::assert_one_line_error(&o, &["not https://"]);
}

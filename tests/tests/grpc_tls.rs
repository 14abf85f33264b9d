//! TLS and mutual TLS on the `llumlet.Llumlet` service (`LLUMLET_RPC_TLS_*`), against the real
//! binary, with certificates made by the `openssl` command: a plain client is not served, a
//! client trusting the CA is, and with a client CA only a client presenting a certificate that CA
//! signed is.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use llumlet_proto::cms::InstanceStatus;
use llumlet_proto::llumlet::llumlet_client::LlumletClient;
use llumlet_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn certificates(dir: &Path) {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=llumlet-test-ca"];
    ca.extend(key);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        let (k, csr, pem, e) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let mut req = vec!["req", "-subj"];
        let cn = format!("/CN=llumlet-test-{who}");
        req.push(&cn);
        req.extend(key);
        req.extend(["-keyout", &k, "-out", &csr]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &e,
            ],
        );
    }
}

async fn tls_client(
    port: u16,
    dir: &Path,
    identity: bool,
) -> Result<LlumletClient<Channel>, tonic::transport::Error> {
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(read("client.pem"), read("client.key")));
    }
    let ch = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(LlumletClient::new(ch))
}

fn status() -> InstanceStatus {
    InstanceStatus {
        update_id: 1,
        num_total_gpu_tokens: 100,
        ..Default::default()
    }
}

/// Retries `f` until the llumlet is up (TLS clients cannot use the plain helper).
async fn until_up<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_serve_only_the_clients_they_should() {
    let dir = TempDir::new("grpc-tls");
    certificates(&dir.0);
    let redis = RedisServer::start();
    let path = |f: &str| dir.0.join(f).display().to_string();

    // TLS: the service's certificate, no client certificate asked.
    let port = free_port();
    let mut env = base_env(&redis, "inst-tls", port);
    env.insert("LLUMLET_RPC_TLS_CERT".into(), path("server.pem"));
    env.insert("LLUMLET_RPC_TLS_KEY".into(), path("server.key"));
    let _p = LlumletProcess::spawn(&env);
    let mut c = until_up(|| tls_client(port, &dir.0, false)).await;
    c.push_instance_status(status()).await.unwrap();
    redis.wait_for(
        "llumnix:instance_status:inst-tls",
        Duration::from_secs(5),
        |b| b.map(|_| ()),
    );
    // A plain client (as the scheduler dials without TLS) is not served.
    let plain = LlumletClient::connect(format!("http://127.0.0.1:{port}")).await;
    if let Ok(mut plain) = plain {
        assert!(plain.push_instance_status(status()).await.is_err());
    }

    // Mutual TLS: only a client presenting a certificate the CA signed.
    let port = free_port();
    let mut env = base_env(&redis, "inst-mtls", port);
    env.insert("LLUMLET_RPC_TLS_CERT".into(), path("server.pem"));
    env.insert("LLUMLET_RPC_TLS_KEY".into(), path("server.key"));
    env.insert("LLUMLET_RPC_TLS_CLIENT_CA".into(), path("ca.pem"));
    let _p = LlumletProcess::spawn(&env);
    let mut c = until_up(|| tls_client(port, &dir.0, true)).await;
    c.push_instance_status(status()).await.unwrap();
    let anonymous = tls_client(port, &dir.0, false).await;
    if let Ok(mut anonymous) = anonymous {
        assert!(anonymous.push_instance_status(status()).await.is_err());
    }
}

#[test]
fn tls_settings_that_cannot_work_stop_the_start() {
    let redis = RedisServer::start();
    for (set, says) in [
        (
            vec![("LLUMLET_RPC_TLS_CERT", "/etc/hostname")],
            "LLUMLET_RPC_TLS_KEY",
        ),
        (
            vec![("LLUMLET_RPC_TLS_CLIENT_CA", "/etc/hostname")],
            "needs LLUMLET_RPC_TLS_CERT",
        ),
        (
            vec![
                ("LLUMLET_RPC_TLS_CERT", "/nonexistent.pem"),
                ("LLUMLET_RPC_TLS_KEY", "/etc/hostname"),
            ],
            "/nonexistent.pem",
        ),
    ] {
        let mut env = base_env(&redis, "inst-tls-bad", free_port());
        for (k, v) in &set {
            env.insert(k.to_string(), v.to_string());
        }
        let mut p = LlumletProcess::spawn(&env);
        assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(2), "{set:?}");
        assert!(p.stderr().contains(says), "{set:?}: {}", p.stderr());
    }
}

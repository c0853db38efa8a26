//! TLS on every link (mTLS between tiers) and API keys at the router, with certificates made here: a client
//! without the key is UNAUTHENTICATED, with it gets the tokens of the plaintext server; plaintext and
//! certificate-less connections are refused.

use std::path::Path;

use afnext_e2e::cluster::{decoder_group, encoder, router};
use afnext_e2e::grpc::{audio, clip, req, run, text, user};
use afnext_e2e::{tempdir, Server};
use afnext_server::cluster_pb::decoder_client::DecoderClient;
use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

/// A CA and one certificate (for localhost and 127.0.0.1) signed by it, written as PEM files.
fn certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("keys.txt"), "# clients\nsecret-1\nsecret-2\n").unwrap();
}

async fn tls_channel(addr: &str, dir: &Path, with_cert: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
        std::fs::read(dir.join("ca.pem")).unwrap(),
    ));
    if with_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(dir.join("cert.pem")).unwrap(),
            std::fs::read(dir.join("key.pem")).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn with_key(r: pb::GenerateRequest, key: &str) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(r);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn ids(
    c: &mut AfNextClient<Channel>,
    r: tonic::Request<pb::GenerateRequest>,
) -> Result<Vec<u32>, tonic::Status> {
    let mut s = c.generate(r).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await? {
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            ids.extend(d.token_ids);
        }
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_cluster_with_api_keys_serves_only_authenticated_clients() {
    let dir = tempdir("tls");
    certificates(&dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let request = || {
        req(
            vec![user(vec![
                audio(clip("mix_75s.flac")),
                text("What is happening here?"),
            ])],
            10,
        )
    };
    let want = run(&mut Server::start(&[]).client().await, request())
        .await
        .unwrap()
        .ids;

    // Tiers: mTLS on their listeners, TLS with their certificate when dialing.
    let (cert, key, ca) = (p("cert.pem"), p("key.pem"), p("ca.pem"));
    let internal = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--tls-ca",
        &ca,
    ];
    let (dec, _f) = decoder_group(1, 0, &internal);
    let enc = encoder(&internal);
    // The router: TLS without client certificates on its public listener, API keys, mTLS to the tiers.
    let keys = p("keys.txt");
    let rt = router(
        &[&dec.addr],
        &[&enc.addr],
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--api-keys-file",
            &keys,
        ],
    );
    let mut c = AfNextClient::new(tls_channel(&rt.addr, &dir, false).await.unwrap());
    let e = ids(&mut c, tonic::Request::new(request()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = ids(&mut c, with_key(request(), "wrong")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        ids(&mut c, with_key(request(), "secret-2")).await.unwrap(),
        want
    );

    // Plaintext to the router fails; the decoder's internal API refuses a client without a certificate.
    let plain = AfNextClient::connect(format!("http://{}", rt.addr)).await;
    if let Ok(mut p) = plain {
        assert!(ids(&mut p, with_key(request(), "secret-1")).await.is_err());
    }
    let refused = match tls_channel(&dec.addr, &dir, false).await {
        Err(_) => true,
        Ok(ch) => DecoderClient::new(ch)
            .push_window(afnext_server::cluster_pb::PushWindowRequest::default())
            .await
            .is_err_and(|s| s.code() != Code::InvalidArgument),
    };
    assert!(
        refused,
        "a client without a certificate reached the decoder"
    );
    // With the certificate, the decoder's API answers (here: a malformed push is INVALID_ARGUMENT).
    let ch = tls_channel(&dec.addr, &dir, true).await.unwrap();
    let e = DecoderClient::new(ch)
        .push_window(afnext_server::cluster_pb::PushWindowRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

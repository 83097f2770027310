//! The VAPID key (RFC 8292): one P-256 key per server, in a file so that it outlives restarts (browsers
//! bind each subscription to the public key they were given; a new key orphans every subscription).

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use serde::Serialize;

use super::{PushError, TokenCache};

/// How long a VAPID token is valid (RFC 8292 allows at most 24 hours).
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A cached token is replaced this long before it expires, so no request carries one about to expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(3600);

pub struct Vapid {
    encoding: jsonwebtoken::EncodingKey,
    public_key: String,
    tokens: TokenCache,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl Vapid {
    /// Reads the key at `path` (PKCS#8 or SEC1 PEM), or makes one there (mode 0600) when there is no file.
    pub fn load_or_create(path: &Path) -> Result<Vapid, PushError> {
        let key = match read_key(path)? {
            Some(key) => key,
            None => {
                let key = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
                write_new(path, &key)?;
                tracing::info!(path = %path.display(), "inbox push: generated a VAPID key");
                key
            }
        };
        Vapid::from_key(&key)
    }

    pub fn from_key(key: &p256::SecretKey) -> Result<Vapid, PushError> {
        let pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| PushError::Key(e.to_string()))?;
        let encoding = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|e| PushError::Key(e.to_string()))?;
        let point = key.public_key().to_encoded_point(false);
        Ok(Vapid {
            encoding,
            public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(point.as_bytes()),
            tokens: TokenCache::default(),
        })
    }

    /// The uncompressed public point, base64url without padding (`applicationServerKey`, the `k=`).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The `Authorization` header for a push service at `aud` (its origin).
    pub fn authorization(&self, aud: &str, subject: &str) -> Result<String, PushError> {
        let token = self.tokens.get_or(aud, || {
            let exp = crate::auth::unix_now() + TOKEN_LIFETIME.as_secs();
            let claims = Claims {
                aud,
                exp,
                sub: subject,
            };
            let t = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
                &claims,
                &self.encoding,
            )
            .map_err(|e| PushError::Key(format!("cannot sign a VAPID token: {e}")))?;
            Ok((t, Instant::now() + TOKEN_LIFETIME - TOKEN_MARGIN))
        })?;
        Ok(format!("vapid t={token}, k={}", self.public_key))
    }
}

/// Where a cluster keeps the VAPID key every node signs with (Redis, NATS): browsers bind a subscription
/// to the public key, so every node must sign with the same one.
pub(super) trait ClusterKey {
    /// The backend, as messages name it ("Redis", "NATS").
    const BACKEND: &'static str;
    /// The key's name in the backend, for messages.
    fn key_name(&self) -> String;
    /// The cluster's key (PEM), if one is stored.
    async fn stored(&self) -> Result<Option<String>, PushError>;
    /// Stores `pem` unless a key is there already, and returns the key held afterwards (this one or the
    /// one another node stored first).
    async fn offer(&self, pem: &str) -> Result<String, PushError>;
}

/// The VAPID key every node of the cluster signs with, kept in `store` and copied to `path`. The first
/// node stores its file's key (or a new one); the others take it. A node whose file holds another key is
/// refused: its subscriptions and the cluster's cannot both be served, and which key wins is the
/// operator's choice, not the start order's.
pub(super) async fn shared_vapid(store: &impl ClusterKey, path: &Path) -> Result<Vapid, PushError> {
    fn backend<S: ClusterKey>(_: &S) -> &'static str {
        S::BACKEND
    }
    let (backend, name) = (backend(store), store.key_name());
    let local = read_key(path)?;
    let held = match store.stored().await? {
        Some(pem) => pem,
        None => {
            let mine = match &local {
                Some(k) => k.clone(),
                None => p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng),
            };
            let held = store.offer(&to_pem(&mine)?).await?;
            tracing::info!(key = %name, "inbox push: the cluster's VAPID key is in {backend}");
            held
        }
    };
    let cluster = parse_pem(&held).map_err(|e| {
        PushError::Key(format!(
            "the VAPID key in {backend} ({name}) is not a P-256 private key in PEM: {e}"
        ))
    })?;
    match local {
        Some(k) if k.public_key() != cluster.public_key() => {
            return Err(PushError::Key(format!(
                "{} holds another VAPID key than the cluster's in {backend} ({name}); every node must \
                 sign with the same key, or push services refuse the pushes of browsers that subscribed \
                 through another node. Remove {} to have this node take the cluster's key, or, to make \
                 this file's key the cluster's, stop every node, delete {name} in {backend} and the key \
                 file of every other node, and start this node first (subscriptions made with the old \
                 key stop working: docs/USAGE.md, \"Web Push set-up\")",
                path.display(),
                path.display()
            )));
        }
        Some(_) => {}
        None => {
            write_new(path, &cluster)?;
            tracing::info!(
                path = %path.display(),
                key = %name,
                "inbox push: copied the cluster's VAPID key from {backend}"
            );
        }
    }
    Vapid::from_key(&cluster)
}

/// The key at `path`, `None` when there is no file (a file that is not a key is an error naming it).
pub(super) fn read_key(path: &Path) -> Result<Option<p256::SecretKey>, PushError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => {
            warn_if_readable(path);
            parse_pem(&pem).map(Some).map_err(|e| {
                PushError::Key(format!(
                    "{} is not a P-256 private key in PEM: {e}",
                    path.display()
                ))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PushError::Key(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// A P-256 private key in PKCS#8 or SEC1 PEM.
pub(super) fn parse_pem(pem: &str) -> Result<p256::SecretKey, String> {
    p256::SecretKey::from_pkcs8_pem(pem)
        .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
        .map_err(|e| e.to_string())
}

/// `key` as PKCS#8 PEM, the form kept in files and in Redis.
pub(super) fn to_pem(key: &p256::SecretKey) -> Result<String, PushError> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(|e| PushError::Key(e.to_string()))
}

/// Creates `path` (mode 0600) holding `key`; an existing file is never overwritten.
pub(super) fn write_new(path: &Path, key: &p256::SecretKey) -> Result<(), PushError> {
    use std::io::Write;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| PushError::Key(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| PushError::Key(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .map_err(|e| PushError::Key(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| PushError::Key(format!("cannot write {}: {e}", path.display())))
}

fn warn_if_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "inbox push: the VAPID key is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_private_and_signs_verifiable_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/vapid.pem");
        let a = Vapid::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = Vapid::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key(), "the key survives a restart");
        assert_eq!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(a.public_key())
                .unwrap()
                .len(),
            65
        );

        let h = a
            .authorization("https://push.example.com", "mailto:ops@example.com")
            .unwrap();
        let rest = h.strip_prefix("vapid t=").unwrap();
        let (token, k) = rest.split_once(", k=").unwrap();
        assert_eq!(k, a.public_key());
        // Verifiable with nothing but the public key the header carries.
        let point = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k)
            .unwrap();
        let public = p256::PublicKey::from_sec1_bytes(&point).unwrap();
        use p256::pkcs8::EncodePublicKey;
        let pem = public.to_public_key_pem(LineEnding::LF).unwrap();
        let dk = jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["https://push.example.com"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &dk, &v).unwrap();
        assert_eq!(data.claims["sub"], "mailto:ops@example.com");
        let exp = data.claims["exp"].as_u64().unwrap();
        let now = crate::auth::unix_now();
        assert!(exp > now && exp <= now + 24 * 3600);

        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            Vapid::load_or_create(&path),
            Err(PushError::Key(_))
        ));
    }
}

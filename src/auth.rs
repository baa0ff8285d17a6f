//! Client tokens: HS256 JWTs whose `sub` is the user id. Checked before the
//! WebSocket upgrade; minted by `chat-hub token` and the dev sign-in.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Verifies and mints client tokens with one secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // The contract: expired means refused; no grace period beyond the claim itself.
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The user a token authenticates, or why it does not.
    pub fn verify(&self, token: &str) -> Result<UserId, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| e.to_string())?;
        if matches!(data.claims.iat, Some(iat) if iat > now_secs()) {
            return Err("token issued in the future (iat)".into());
        }
        UserId::parse(&data.claims.sub)
    }

    /// A token for `user` valid for `ttl_secs` from now.
    pub fn mint(&self, user: &UserId, ttl_secs: u64) -> Result<String, String> {
        let now = now_secs();
        let claims = Claims {
            sub: user.to_string(),
            exp: now + ttl_secs,
            iat: Some(now),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| e.to_string())
    }

    /// Mint with arbitrary claims (tests of expired, not-yet-valid and malformed tokens).
    pub fn mint_raw(&self, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_valid_and_refuses_the_rest() {
        let k = TokenKeys::new("0123456789abcdef0123");
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(k.verify(&k.mint(&alice, 60).unwrap()).unwrap(), alice);
        let now = now_secs();
        assert!(k
            .verify(&k.mint_raw(&json!({"sub":"alice","exp": now - 1})))
            .is_err());
        assert!(k.verify(&k.mint_raw(&json!({"sub":"alice"}))).is_err());
        assert!(k
            .verify(&k.mint_raw(&json!({"sub":"al ice","exp": now + 60})))
            .is_err());
        assert!(k
            .verify(&k.mint_raw(&json!({"sub":"alice","exp": now + 60,"nbf": now + 30})))
            .is_err());
        assert!(k
            .verify(&k.mint_raw(&json!({"sub":"alice","exp": now + 60,"iat": now + 30})))
            .is_err());
        let other = TokenKeys::new("another-secret-of-16");
        assert!(other.verify(&k.mint(&alice, 60).unwrap()).is_err());
        assert!(k.verify("not.a.jwt").is_err());
    }
}

//! API tokens. A token is `pfx_` + 32 random bytes (base64url); only its SHA-256 is stored, so
//! the catalogue does not hold usable secrets. Roles: `admin` (everything: deploy, delete,
//! tokens, dead letters) and `invoke` (invoke token-protected functions, read the function
//! list). Lookups compare digests of the presented token, so their timing says nothing useful
//! about a stored token.

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Invoke,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Invoke => "invoke",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "invoke" => Some(Role::Invoke),
            _ => None,
        }
    }
}

/// A fresh random token.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("pfx_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The role of the request's token; 401 without a valid one.
pub async fn role(catalogue: &pixflow_backends::Catalogue, headers: &HeaderMap) -> Result<Role, Problem> {
    let token = bearer(headers).ok_or_else(Problem::unauthorized)?;
    let role = catalogue.token_role(&digest(token)).await?;
    role.as_deref().and_then(Role::parse).ok_or_else(Problem::unauthorized)
}

/// The role of the request's token and who it is for the change feed (its label and id);
/// 401 without a valid token.
pub async fn caller(
    catalogue: &pixflow_backends::Catalogue,
    headers: &HeaderMap,
) -> Result<(Role, pixflow_backends::Actor), Problem> {
    let token = bearer(headers).ok_or_else(Problem::unauthorized)?;
    let hash = digest(token);
    let (role, label) = catalogue.token_role_and_label(&hash).await?.ok_or_else(Problem::unauthorized)?;
    let role = Role::parse(&role).ok_or_else(Problem::unauthorized)?;
    Ok((role, pixflow_backends::Actor::token(&label, &hex::encode(&hash[..4]))))
}

/// 401 without a valid token, 403 unless it is an admin token.
pub async fn admin(catalogue: &pixflow_backends::Catalogue, headers: &HeaderMap) -> Result<(), Problem> {
    match role(catalogue, headers).await? {
        Role::Admin => Ok(()),
        Role::Invoke => Err(Problem::forbidden("this needs an admin token")),
    }
}

/// A fresh unguessable id, ordered by creation time: 12 hex digits of milliseconds, then 16
/// random bytes. An invocation id is a capability: whoever holds it may read the invocation.
pub fn invocation_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    let mut id = format!("{:012x}", pixflow_backends::state::now_ms());
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_parsed_from_bearer_headers() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("pfx_") && a.len() == 47, "{a}");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("bearer {a}").parse().unwrap());
        assert_eq!(bearer(&h), Some(a.as_str()));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&h), None);
        let (x, y) = (invocation_id().unwrap(), invocation_id().unwrap());
        assert_eq!(x.len(), 44);
        assert_ne!(x, y);
    }
}

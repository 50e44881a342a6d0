//! Authorization: an access file maps client identities (the CN or a SAN of their certificate)
//! to namespaces and roles. When it is on, whatever is not granted is denied.
//!
//! ```toml
//! [[grant]]
//! identity = "worker"        # certificate CN or SAN
//! namespace = "default"      # or "*" for every namespace
//! roles = ["worker"]         # worker | client | admin
//! worker_identities = ["gpu-7", "gpu-8-*"]   # optional; see below
//! ```
//!
//! `worker`: poll, complete, fail, heartbeat, register. `client`: start, signal, cancel, describe,
//! history, list, results, standalone activities, sessions, queues and workers. `admin`:
//! everything, including namespaces and terminate.
//!
//! A worker's identity is bound to its certificate, so one worker cannot pose as another (take
//! its host queue, its sessions, its attempts): with the worker role, the identity a call acts as
//! must be one the grant lists in `worker_identities` (exact names, or prefixes ending in `*`),
//! or, where the grant lists none, the certificate's own identity or that identity followed by
//! `-` and anything (`gpu-7` may run as `gpu-7` or `gpu-7-3f2a9c1e`, tether's default form).
//! Admins may act as any worker.
//!
//! Which role each RPC needs, and where its namespace is, is one table: `frontend/access.rs`.

use serde::Deserialize;
use std::path::Path;
use tonic::{Request, Status};

/// A role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs workflows and activities.
    Worker,
    /// Starts and inspects work.
    Client,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

/// One grant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Certificate CN or SAN.
    pub identity: String,
    /// Namespace, or "*".
    pub namespace: String,
    /// Roles granted there.
    pub roles: Vec<Role>,
    /// With the worker role: the worker identities the caller may act as (exact, or a prefix
    /// ending in `*`). Empty: its certificate identity, alone or followed by `-…`.
    #[serde(default)]
    pub worker_identities: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default)]
    grant: Vec<Grant>,
}

/// The grants in force.
#[derive(Debug, Clone, Default)]
pub struct Access {
    grants: Vec<Grant>,
}

impl Access {
    /// Parses an access file.
    pub fn parse(text: &str, path: &str) -> Result<Access, String> {
        let file: AccessFile =
            toml::from_str(text).map_err(|e| format!("access file {path} is invalid: {e}"))?;
        if file.grant.is_empty() {
            return Err(format!(
                "access file {path} grants nothing; add [[grant]] entries"
            ));
        }
        Ok(Access { grants: file.grant })
    }

    /// How many grants the rules hold.
    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    /// Reads and parses an access file.
    pub fn load(path: &Path) -> Result<Access, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("could not read access file {}: {e}", path.display()))?;
        Access::parse(&text, &path.display().to_string())
    }

    fn allowed(&self, identities: &[String], namespace: &str, role: Role) -> bool {
        self.grants.iter().any(|g| {
            identities.contains(&g.identity)
                && (g.namespace == "*" || g.namespace == namespace)
                && g.roles.iter().any(|r| *r == role || *r == Role::Admin)
        })
    }

    /// Allows the call or says who lacks what where.
    pub fn check(&self, identities: &[String], namespace: &str, role: Role) -> Result<(), Status> {
        if self.allowed(identities, namespace, role) {
            return Ok(());
        }
        let who = if identities.is_empty() {
            "an unauthenticated caller (no client certificate)".to_string()
        } else {
            format!("identity {:?}", identities[0])
        };
        Err(Status::permission_denied(format!(
            "{who} lacks role {:?} in namespace {namespace:?}; grant it in the access file",
            role.name()
        )))
    }

    /// Allows a caller with the worker role to act as worker `worker` in `namespace`, or says
    /// why not (see the module docs: the identity is bound to the certificate).
    pub fn check_worker_identity(
        &self,
        identities: &[String],
        namespace: &str,
        worker: &str,
    ) -> Result<(), Status> {
        if worker.is_empty() || self.allowed(identities, namespace, Role::Admin) {
            return Ok(());
        }
        let grants: Vec<&Grant> = self
            .grants
            .iter()
            .filter(|g| {
                identities.contains(&g.identity)
                    && (g.namespace == "*" || g.namespace == namespace)
                    && g.roles.contains(&Role::Worker)
            })
            .collect();
        let listed: Vec<&String> = grants.iter().flat_map(|g| &g.worker_identities).collect();
        let allowed = if listed.is_empty() {
            identities.iter().any(|own| {
                worker == own
                    || worker
                        .strip_prefix(own.as_str())
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        } else {
            listed
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => worker.starts_with(prefix),
                    None => worker == pattern.as_str(),
                })
        };
        if allowed {
            return Ok(());
        }
        let who = identities
            .first()
            .map(|i| format!("identity {i:?}"))
            .unwrap_or_else(|| "an unauthenticated caller".into());
        let may = if listed.is_empty() {
            "its own name, or its name followed by \"-...\"".to_string()
        } else {
            format!(
                "only {}",
                listed
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(Status::permission_denied(format!(
            "{who} may not act as worker {:?} in namespace {namespace:?}: a worker's identity is \
             bound to its certificate, and this one may use {may}; list the identity in the \
             grant's worker_identities, or run the worker under an allowed identity",
            tether_core::types::quote_prefix(worker, 80)
        )))
    }

    /// Whether the identities hold any grant at all (for calls that name no namespace).
    pub fn known(&self, identities: &[String]) -> bool {
        self.grants.iter().any(|g| identities.contains(&g.identity))
    }
}

/// A request's identities, worked out once by the interceptor and carried in its extensions so
/// the handler does not parse the certificate again.
#[derive(Clone)]
pub struct CallerIdentities(pub std::sync::Arc<Vec<String>>);

/// Works out a request's identities and attaches them to it (see [`identities_of`]); None for
/// a caller without a client certificate (nothing to attach).
pub fn attach_identities<T>(request: &mut Request<T>) -> Option<std::sync::Arc<Vec<String>>> {
    request.peer_certs()?;
    let ids = std::sync::Arc::new(parse_identities(request));
    request
        .extensions_mut()
        .insert(CallerIdentities(ids.clone()));
    Some(ids)
}

/// The identities a request's client certificate carries: its common name(s), then its DNS SANs.
pub fn identities_of<T>(request: &Request<T>) -> Vec<String> {
    match request.extensions().get::<CallerIdentities>() {
        Some(known) => known.0.as_ref().clone(),
        None => parse_identities(request),
    }
}

fn parse_identities<T>(request: &Request<T>) -> Vec<String> {
    let Some(certs) = request.peer_certs() else {
        return Vec::new();
    };
    let Some(first) = certs.first() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(first.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                out.push(d.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_and_denials() {
        let access = Access::parse(
            r#"
            [[grant]]
            identity = "alice"
            namespace = "default"
            roles = ["client"]
            [[grant]]
            identity = "root"
            namespace = "*"
            roles = ["admin"]
            "#,
            "f",
        )
        .unwrap();
        let alice = vec!["alice".to_string()];
        assert!(access.check(&alice, "default", Role::Client).is_ok());
        let e = access.check(&alice, "billing", Role::Client).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("identity \"alice\" lacks role \"client\" in namespace \"billing\""),
            "{}",
            e.message()
        );
        assert!(access.check(&alice, "default", Role::Worker).is_err());
        assert!(access
            .check(&["root".into()], "anything", Role::Worker)
            .is_ok());
        assert!(access
            .check(&[], "default", Role::Client)
            .unwrap_err()
            .message()
            .contains("unauthenticated"));
        assert!(Access::parse("", "f").is_err());
        let bound = Access::parse(
            r#"
            [[grant]]
            identity = "gpu-7"
            namespace = "*"
            roles = ["worker"]
            [[grant]]
            identity = "pool"
            namespace = "default"
            roles = ["worker"]
            worker_identities = ["pool-a", "batch-*"]
            "#,
            "f",
        )
        .unwrap();
        let gpu7 = vec!["gpu-7".to_string()];
        assert!(bound
            .check_worker_identity(&gpu7, "default", "gpu-7")
            .is_ok());
        assert!(bound
            .check_worker_identity(&gpu7, "default", "gpu-7-3f2a9c1e")
            .is_ok());
        let e = bound
            .check_worker_identity(&gpu7, "default", "gpu-70")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("may not act as worker \"gpu-70\""),
            "{}",
            e.message()
        );
        let pool = vec!["pool".to_string()];
        assert!(bound
            .check_worker_identity(&pool, "default", "pool-a")
            .is_ok());
        assert!(bound
            .check_worker_identity(&pool, "default", "batch-17")
            .is_ok());
        assert!(bound
            .check_worker_identity(&pool, "default", "pool-b")
            .is_err());
        assert!(bound
            .check_worker_identity(&pool, "default", "pool")
            .is_err());
        assert!(access
            .check_worker_identity(&["root".into()], "x", "anyone")
            .is_ok());
        assert!(Access::parse(
            "[[grant]]\nidentity = \"x\"\nnamespace = \"*\"\nroles = [\"god\"]\n",
            "f"
        )
        .is_err());
    }
}

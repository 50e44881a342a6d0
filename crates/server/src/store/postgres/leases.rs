//! The cluster's rows: replicas and where they listen, and one lease per namespace (its owner,
//! epoch and expiry, all by the database's clock). What a replica does with them is in
//! `crate::cluster`; here is only how they are read and changed, each change one statement
//! whose condition makes it safe when replicas race.

use super::{PostgresStore, StoreError};
use crate::store::api::{ClusterView, LeaseRow, ReplicaRow};
use tether_core::types::Namespace;

/// Runs `sql` in a transaction that holds `namespace`'s advisory lock exclusively: the old
/// holder's transactions that passed the fence finish first, and none after this one passes it
/// (see `schema::FENCE_LOCK`). `sql` updates the lease's row, which also waits for the writes
/// that locked the row instead (`schema::one_statement_write`).
async fn under_namespace_lock(
    mut client: deadpool_postgres::Object,
    namespace: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(7233, hashtext($1))",
        &[&namespace],
    )
    .await?;
    let rows = tx.query(sql, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// The renewal of every lease a replica still holds. The rows are locked in namespace order
/// (by `locked`, before the update touches them), the order in which the writer's one-statement
/// fence locks them (see `schema::one_statement_write`): taken in another order, a renewal and
/// a commit under two of the same leases could each wait for the other.
const RENEW_LEASES: &str = "WITH locked AS MATERIALIZED (
         SELECT namespace FROM leases
         WHERE owner = $1 AND expires_at > clock_timestamp()
         ORDER BY namespace FOR UPDATE)
     UPDATE leases l SET renewed_at = clock_timestamp(),
         expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
     FROM locked WHERE l.namespace = locked.namespace
     RETURNING l.namespace, l.epoch";

/// How long a replica that holds no lease stays listed after it was last seen.
pub(crate) const FORGET_REPLICAS_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl PostgresStore {
    /// Records (or refreshes) a replica and its address; and forgets replicas not seen for
    /// [`FORGET_REPLICAS_AFTER`] that hold no lease. A replica id is its host and port by
    /// default, so where hosts come and go (containers get new names) every start would
    /// otherwise leave a row behind for good, and `tether cluster status` would list them all.
    pub fn register_replica(&self, replica_id: &str, address: &str) -> Result<(), StoreError> {
        let (id, address) = (replica_id.to_string(), address.to_string());
        let forget_s = FORGET_REPLICAS_AFTER.as_secs_f64();
        self.query(move |client| async move {
            client
                .execute(
                    "INSERT INTO replicas (replica_id, address) VALUES ($1, $2)
                     ON CONFLICT (replica_id) DO UPDATE SET address = EXCLUDED.address,
                         started_at = now(), seen_at = now()",
                    &[&id, &address],
                )
                .await?;
            let forgotten = client
                .execute(
                    "DELETE FROM replicas r
                     WHERE r.seen_at < now() - $1::float8 * interval '1 second'
                       AND NOT EXISTS (SELECT 1 FROM leases l
                                       WHERE l.owner = r.replica_id
                                         AND l.expires_at > clock_timestamp())",
                    &[&forget_s],
                )
                .await?;
            if forgotten > 0 {
                tracing::info!(
                    forgotten,
                    unseen_for_s = forget_s,
                    "forgot replicas long unseen that hold no lease"
                );
            }
            Ok(())
        })
    }

    /// The replica's heartbeat and the renewal of every lease it still holds (one that lapsed
    /// is not renewed: another replica may be taking it over). Returns (namespace, epoch) of
    /// the leases renewed.
    pub fn renew_leases(
        &self,
        replica_id: &str,
        lease_ms: u64,
    ) -> Result<Vec<(Namespace, i64)>, StoreError> {
        let id = replica_id.to_string();
        let lease_ms = lease_ms as i64;
        self.query(move |client| async move {
            client
                .execute(
                    "UPDATE replicas SET seen_at = now() WHERE replica_id = $1",
                    &[&id],
                )
                .await?;
            let rows = client.query(RENEW_LEASES, &[&id, &lease_ms]).await?;
            Ok(rows
                .iter()
                .map(|r| (Namespace::from(r.get::<_, String>(0)), r.get(1)))
                .collect())
        })
    }

    /// Takes `namespace`'s lease if it has lapsed (or is free, or is already this replica's:
    /// an engine that failed is reopened under a new epoch). Returns the new epoch, or None
    /// when another replica holds it.
    pub fn claim_lease(
        &self,
        replica_id: &str,
        namespace: &Namespace,
        lease_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        let (id, namespace) = (replica_id.to_string(), namespace.to_string());
        let lease_ms = lease_ms as i64;
        self.query(move |client| async move {
            // A namespace created before leases existed gets its row here.
            client
                .execute(
                    "INSERT INTO leases (namespace) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&namespace],
                )
                .await?;
            let rows = under_namespace_lock(
                client,
                &namespace,
                "UPDATE leases SET owner = $1, epoch = epoch + 1,
                     acquired_at = clock_timestamp(), renewed_at = clock_timestamp(),
                     expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                 WHERE namespace = $2 AND (expires_at <= clock_timestamp() OR owner = $1)
                 RETURNING epoch",
                &[&id, &namespace, &lease_ms],
            )
            .await?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    /// Gives a lease up (a replica shedding load, or stopping): the next claim needs no wait.
    /// Only the holder at `epoch` can.
    pub fn release_lease(
        &self,
        replica_id: &str,
        namespace: &Namespace,
        epoch: i64,
    ) -> Result<bool, StoreError> {
        let (id, namespace) = (replica_id.to_string(), namespace.to_string());
        self.query(move |client| async move {
            let rows = under_namespace_lock(
                client,
                &namespace,
                "UPDATE leases SET owner = '', expires_at = '-infinity'
                 WHERE namespace = $2 AND owner = $1 AND epoch = $3 RETURNING epoch",
                &[&id, &namespace, &epoch],
            )
            .await?;
            Ok(rows.len() == 1)
        })
    }

    /// Replicas and leases now. Every namespace has a lease row afterwards (those created by
    /// a server without leases, or by a replica that died before it took theirs, get one).
    pub fn cluster_view(&self) -> Result<ClusterView, StoreError> {
        self.query(move |client| async move {
            // The default namespace exists from the first start: its engine creates its row.
            client
                .execute(
                    "INSERT INTO leases (namespace) SELECT name FROM namespaces
                     UNION SELECT $1 ON CONFLICT DO NOTHING",
                    &[&tether_core::types::DEFAULT_NAMESPACE],
                )
                .await?;
            let ms = |column: &str| format!("(EXTRACT(EPOCH FROM ({column})) * 1000)::BIGINT");
            let replicas = client
                .query(
                    &format!(
                        "SELECT replica_id, address, {}, {} FROM replicas ORDER BY seen_at DESC",
                        ms("clock_timestamp() - seen_at"),
                        ms("clock_timestamp() - started_at"),
                    ),
                    &[],
                )
                .await?
                .iter()
                .map(|r| ReplicaRow {
                    replica_id: r.get(0),
                    address: r.get(1),
                    seen_ms_ago: r.get(2),
                    up_ms: r.get(3),
                })
                .collect();
            let leases = client
                .query(
                    &format!(
                        "SELECT namespace, owner, epoch, {}, {},
                                CASE WHEN expires_at = '-infinity' THEN -1 ELSE {} END
                         FROM leases ORDER BY namespace",
                        ms("clock_timestamp() - acquired_at"),
                        ms("clock_timestamp() - renewed_at"),
                        ms("expires_at - clock_timestamp()"),
                    ),
                    &[],
                )
                .await?
                .iter()
                .map(|r| LeaseRow {
                    namespace: r.get(0),
                    owner: r.get(1),
                    epoch: r.get(2),
                    held_ms: r.get(3),
                    renewed_ms_ago: r.get(4),
                    expires_in_ms: r.get(5),
                })
                .collect();
            Ok(ClusterView { replicas, leases })
        })
    }

    /// Every namespace (for a replica asked to list them: it holds only its own in memory).
    pub fn namespaces(&self) -> Result<Vec<tether_wire::pb::NamespaceInfo>, StoreError> {
        use prost::Message;
        self.query(move |client| async move {
            client
                .query("SELECT info FROM namespaces ORDER BY name", &[])
                .await?
                .iter()
                .map(|r| {
                    Ok(tether_wire::pb::NamespaceInfo::decode(
                        r.get::<_, &[u8]>(0),
                    )?)
                })
                .collect()
        })
    }
}

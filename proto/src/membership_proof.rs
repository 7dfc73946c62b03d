//! Proofs that both ends of a heartbeat stream hold the same cluster secret
//! (issue 18 M2, design note 33). View ids do not depend on the secret
//! (design note 20), so without these a gateway with a wrong secret would
//! be leased and mint sessions whose tokens no router can open.
//!
//! Gateway → router, per heartbeat: HMAC(membership key, label ‖ node id ‖
//! incarnation ‖ sequence). Router → gateway, per reply: HMAC(membership
//! key, label ‖ router id ‖ sequence ‖ view id), under the key that
//! verified the gateway's proof (a router holds the previous secret during
//! a rotation). An empty proof comes from a peer one version older.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::ClusterKeys;

const GATEWAY_LABEL: &[u8] = b"jvpn-membership-gateway-v1";
const ROUTER_LABEL: &[u8] = b"jvpn-membership-router-v1";

fn mac(keys: &ClusterKeys, label: &[u8], name: &str, a: u64, b: u64, tail: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(keys.membership_key())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(label);
    m.update(&(name.len() as u64).to_be_bytes());
    m.update(name.as_bytes());
    m.update(&a.to_be_bytes());
    m.update(&b.to_be_bytes());
    m.update(tail);
    m
}

/// The gateway's proof for one heartbeat.
pub fn gateway_proof(keys: &ClusterKeys, node: &str, incarnation: u64, sequence: u64) -> Vec<u8> {
    mac(keys, GATEWAY_LABEL, node, incarnation, sequence, &[])
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Constant-time check of a gateway's proof.
pub fn verify_gateway_proof(
    keys: &ClusterKeys,
    node: &str,
    incarnation: u64,
    sequence: u64,
    proof: &[u8],
) -> bool {
    mac(keys, GATEWAY_LABEL, node, incarnation, sequence, &[])
        .verify_slice(proof)
        .is_ok()
}

/// The router's proof for one reply.
pub fn router_proof(keys: &ClusterKeys, router_id: &str, sequence: u64, view_id: &[u8]) -> Vec<u8> {
    mac(keys, ROUTER_LABEL, router_id, sequence, 0, view_id)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Constant-time check of a router's proof.
pub fn verify_router_proof(
    keys: &ClusterKeys,
    router_id: &str,
    sequence: u64,
    view_id: &[u8],
    proof: &[u8],
) -> bool {
    mac(keys, ROUTER_LABEL, router_id, sequence, 0, view_id)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ClusterSecret;

    #[test]
    fn proofs_verify_only_under_the_same_secret_and_fields() {
        let k = ClusterSecret::new(1, [7; 32]).derive();
        let same_id_other_secret = ClusterSecret::new(1, [8; 32]).derive();
        let p = gateway_proof(&k, "g1", 5, 9);
        assert!(verify_gateway_proof(&k, "g1", 5, 9, &p));
        assert!(!verify_gateway_proof(&same_id_other_secret, "g1", 5, 9, &p));
        assert!(!verify_gateway_proof(&k, "g2", 5, 9, &p));
        assert!(!verify_gateway_proof(&k, "g1", 6, 9, &p));
        assert!(!verify_gateway_proof(&k, "g1", 5, 10, &p));
        assert!(!verify_gateway_proof(&k, "g1", 5, 9, &[]));
        let r = router_proof(&k, "r1", 9, &[1; 8]);
        assert!(verify_router_proof(&k, "r1", 9, &[1; 8], &r));
        assert!(!verify_router_proof(
            &same_id_other_secret,
            "r1",
            9,
            &[1; 8],
            &r
        ));
        assert!(!verify_router_proof(&k, "r1", 9, &[2; 8], &r));
        // A gateway's proof is never a router's.
        assert!(!verify_router_proof(&k, "g1", 5, &[], &p));
    }
}

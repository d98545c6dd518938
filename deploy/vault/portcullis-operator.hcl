# The Vault policy of the Portcullis operator: the least it needs. The README explains each rule;
# tests/vault.rs gives the operator exactly this policy.

# The stages' ACL policies, named <namespace>-<pipeline>-<stage>.
path "sys/policies/acl/*" {
  capabilities = ["create", "read", "update", "delete"]
}

# The stages' roles on the workloads' Kubernetes auth mount (--vault-workload-auth-mount).
path "auth/kubernetes/role/*" {
  capabilities = ["create", "read", "update", "delete"]
}

# The dynamic credentials the stages ask for: list each secrets engine's creds path you allow.
path "database/creds/*" {
  capabilities = ["read"]
}

# Renew, look up and revoke the leases it issued.
path "sys/leases/renew" {
  capabilities = ["update"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
}
path "sys/leases/lookup" {
  capabilities = ["update"]
}
# List the leases under each credentials path, to revoke those no pipeline recorded (the
# sweep): one line per engine, as for the creds above. Vault and OpenBao require sudo for
# listing leases; on this path it grants nothing else.
path "sys/leases/lookup/database/creds/*" {
  capabilities = ["list", "sudo"]
}

# Its own token (Vault's default policy grants these too).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# The Vault policy of the Portcullis operator: the least it needs. The README explains each rule;
# tests/vault.rs gives the operator exactly this policy.

# Everything the operator writes is named with its prefix (--vault-name-prefix, default
# "portcullis-"): with another prefix, change "portcullis-" below to match. Without the prefix
# this policy would let the operator rewrite any ACL policy (root and admin included): root in
# Vault, in effect.

# The stages' ACL policies, named portcullis-<namespace>-<pipeline>-<stage>-<hash>.
path "sys/policies/acl/portcullis-*" {
  capabilities = ["create", "read", "update", "delete"]
}

# The stages' roles on the workloads' Kubernetes auth mount (--vault-workload-auth-mount). A role
# it writes may carry only one policy, with the prefix, so it cannot hand out root or admin. The
# operator sends token_policies as one string (Vault matches allowed_parameters globs against
# strings, never lists); a comma would smuggle in a second policy, so commas are denied.
path "auth/kubernetes/role/portcullis-*" {
  capabilities = ["create", "read", "update", "delete"]
  allowed_parameters = {
    "token_policies" = ["portcullis-*"]
    "*"              = []
  }
  denied_parameters = {
    "token_policies" = ["*,*", "portcullis-operator"]
    "policies"       = []
  }
}

# The operator's own policy and login role share the prefix: without these, its token could
# rewrite its own policy (to `path "*"`) or hand its policy to a stage. An exact path wins over
# the globs above. With another --vault-auth-role or policy name, deny those instead.
path "sys/policies/acl/portcullis-operator" {
  capabilities = ["deny"]
}
path "auth/kubernetes/role/portcullis-operator" {
  capabilities = ["deny"]
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

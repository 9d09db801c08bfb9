#!/bin/sh
# Makes what gradguard needs to run with TLS and bearer tokens:
#
#   ca.crt, ca.key          a certificate authority (keep ca.key off the servers)
#   server.crt, server.key  gradguard's certificate, signed by the CA, for the
#                           compose services, the Kubernetes Service, localhost
#   worker.token            a bearer token for training jobs (principal `trainers`, scope ingest:*)
#   ops.token               a bearer token for operators (principal `ops`, scope admin)
#   auth.toml               the principals for `gradguard serve --auth`: the
#                           tokens' SHA-256, never the tokens themselves
#
# Usage: deploy/make-secrets.sh [--renew] [DIR]      (POSIX sh and the openssl CLI)
#
# DIR defaults to deploy/docker/secrets/, which git and the Docker build
# context leave out and deploy/docker/compose.yaml mounts as secrets.
# Nothing that exists is overwritten, except:
#   --renew     issue a new server key and certificate from the existing CA
#               (rotation: gradguard re-reads the files when they change, and
#               they are rewritten in place, so a container's bind mount sees
#               the new ones);
#   auth.toml   written again whenever a token is made (delete a token file
#               and run this again to replace that token).
# Environment:
#   GRADGUARD_CERT_DAYS   validity of the server certificate (default 365; the CA gets 10 times that)
#   GRADGUARD_NAMESPACE   Kubernetes namespace for the Service's names (default gradguard)
#   GRADGUARD_EXTRA_SANS  more subjectAltNames, e.g. DNS:gradguard.example.com,IP:10.0.0.7
set -eu

renew=no
if [ "${1:-}" = "--renew" ]; then
  renew=yes
  shift
fi
case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  -*)
    echo "make-secrets.sh: unknown option $1 (see --help)" >&2
    exit 2
    ;;
esac
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
out=${1:-$here/docker/secrets}
days=${GRADGUARD_CERT_DAYS:-365}
ns=${GRADGUARD_NAMESPACE:-gradguard}

command -v openssl >/dev/null 2>&1 || {
  echo "make-secrets.sh: needs the openssl command" >&2
  exit 1
}

umask 077
mkdir -p "$out"
# Only the owner may open the directory: the files inside are readable by
# anyone who can reach them (0644), so that the container's user (not the
# owner: compose bind-mounts secret files as they are) can read them.
chmod 700 "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# The server's names: the compose services (Prometheus scrapes gradguard-1
# and gradguard-2 by name), the headless Service and its pods
# (gradguard-0.gradguard.<namespace>.svc...), and loopback for published ports.
sans="DNS:gradguard,DNS:gradguard-1,DNS:gradguard-2"
sans="$sans,DNS:gradguard.$ns,DNS:gradguard.$ns.svc,DNS:*.gradguard.$ns.svc"
sans="$sans,DNS:gradguard.$ns.svc.cluster.local,DNS:*.gradguard.$ns.svc.cluster.local"
sans="$sans,DNS:localhost,IP:127.0.0.1,IP:::1"
if [ -n "${GRADGUARD_EXTRA_SANS:-}" ]; then
  sans="$sans,$GRADGUARD_EXTRA_SANS"
fi

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $sans
EOF

# Copies a new file over an old one in place (same inode: a single-file bind
# mount sees it), readable as said above.
install_file() {
  cat "$1" >"$2"
  chmod 644 "$2"
}

made=""
if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
  if [ "$renew" = yes ]; then
    echo "make-secrets.sh: --renew needs the CA in $out (ca.crt, ca.key)" >&2
    exit 1
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$work/ca.key" -sha256 -days $((days * 10)) \
    -subj "/CN=gradguard CA" -config "$work/openssl.cnf" -extensions ca -out "$work/ca.crt"
  cp "$work/ca.key" "$out/ca.key" # 0600: only this script needs it
  install_file "$work/ca.crt" "$out/ca.crt"
  rm -f "$out/server.crt" "$out/server.key" # from another CA
  made="$made ca.crt ca.key"
fi

if [ "$renew" = yes ] || [ ! -s "$out/server.key" ] || [ ! -s "$out/server.crt" ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/server.key" 2>/dev/null
  openssl req -new -key "$work/server.key" -subj "/CN=gradguard" -config "$work/openssl.cnf" -out "$work/server.csr"
  openssl x509 -req -in "$work/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
    -extfile "$work/openssl.cnf" -extensions server -out "$work/server.crt" 2>/dev/null
  openssl verify -CAfile "$out/ca.crt" "$work/server.crt" >/dev/null
  # Key first, certificate right after: gradguard takes a pair once the two match.
  install_file "$work/server.key" "$out/server.key"
  install_file "$work/server.crt" "$out/server.crt"
  made="$made server.crt server.key"
fi

new_tokens=no
for name in worker ops; do
  if [ ! -s "$out/$name.token" ]; then
    openssl rand -hex 32 | tr -d '\n' >"$out/$name.token" # 0600: for the clients only
    new_tokens=yes
    made="$made $name.token"
  fi
done

# The hex SHA-256 of a token file's contents (what `gradguard auth hash-token` prints).
sha256_of() {
  openssl dgst -sha256 <"$1" | sed 's/^.*= *//'
}

if [ "$new_tokens" = yes ] || [ ! -s "$out/auth.toml" ]; then
  cat >"$work/auth.toml" <<EOF
# gradguard serve --auth: who may do what. Written by deploy/make-secrets.sh;
# re-read on SIGHUP. Only the tokens' SHA-256 is here (the tokens are in
# worker.token and ops.token, next to this file, for the clients).
# Scopes: ingest:<job pattern> (worker streams), query:<job pattern> (read),
# admin (everything); * matches any characters, e.g. ingest:team-a/*.

[[principal]]
name = "trainers"
token_sha256 = "$(sha256_of "$out/worker.token")"
scopes = ["ingest:*"]

[[principal]]
name = "ops"
token_sha256 = "$(sha256_of "$out/ops.token")"
scopes = ["admin"]
EOF
  install_file "$work/auth.toml" "$out/auth.toml"
  made="$made auth.toml"
fi

echo "make-secrets.sh: in $out"
echo "  made:${made:- nothing (everything was there; --renew issues a new server certificate)}"
echo "  CA for clients and Prometheus:  $out/ca.crt"
echo "  server certificate and key:     $out/server.crt $out/server.key"
echo "  principals (serve --auth):      $out/auth.toml"
echo "  worker token (ingest:*):        $out/worker.token   e.g. GRADGUARD_TOKEN_FILE=$out/worker.token"
echo "  ops token (admin):              $out/ops.token"
echo "  server names: $sans"

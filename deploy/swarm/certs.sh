#!/usr/bin/env bash
# The cluster's certificates: a CA of its own, one server certificate per node (its name and
# address), and the engine's client certificate. Docker's TLS (`--tlsverify`) then admits only
# clients with a certificate of this CA, and the engine checks each node's against it: mutual.
#
#   deploy/swarm/certs.sh DIR engine                 # DIR/ca.pem, DIR/engine/{ca,cert,key}.pem
#   deploy/swarm/certs.sh DIR node NAME ADDRESS      # DIR/NAME/{ca,cert,key}.pem
#
# The CA's key stays in DIR/ca-key.pem (mode 600): keep it off the nodes. Certificates last
# 825 days; made again by running this once more (an existing CA is reused).
set -euo pipefail

dir=${1:?usage: certs.sh DIR engine | node NAME ADDRESS}
what=${2:?usage: certs.sh DIR engine | node NAME ADDRESS}
mkdir -p "$dir"
umask 077

if [[ ! -s $dir/ca.pem || ! -s $dir/ca-key.pem ]]; then
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
		-subj "/CN=sandbox-engine cluster CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
		-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
		2>/dev/null
fi

issue() { # issue OUT CN EXTENSIONS
	local out=$1 cn=$2 ext=$3
	mkdir -p "$out"
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$cn" \
		-keyout "$out/key.pem" -out "$out/req.csr" 2>/dev/null
	openssl x509 -req -in "$out/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
		-CAcreateserial -days 825 -extfile <(printf '%s\n' "$ext") -out "$out/cert.pem" 2>/dev/null
	rm -f "$out/req.csr"
	cp "$dir/ca.pem" "$out/ca.pem"
	chmod 644 "$out/ca.pem" "$out/cert.pem"
}

case $what in
engine)
	issue "$dir/engine" "sandbox-engine" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
	;;
node)
	name=${3:?node NAME ADDRESS}
	address=${4:?node NAME ADDRESS}
	issue "$dir/$name" "$name" "extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment
subjectAltName=DNS:$name,IP:$address,IP:127.0.0.1"
	;;
*)
	echo "certs.sh: unknown kind $what (engine | node)" >&2
	exit 2
	;;
esac

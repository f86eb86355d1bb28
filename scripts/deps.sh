#!/usr/bin/env bash
# Local stack for development and tests: PostgreSQL, Redis and a single-node Apache Kafka
# (KRaft), all on 127.0.0.1, installed if missing. Idempotent: a dependency that already
# answers is left alone, so a second run takes seconds.
#
#   scripts/deps.sh up     install (if needed) and start everything, wait until each answers
#   scripts/deps.sh down   stop what `up` started
#   scripts/deps.sh status one line per dependency
#
# State (data, logs, Kafka jars) lives in $INVOICE_DEPS_DIR (default /var/tmp/invoice-deps):
# outside the checkout because PostgreSQL runs as the `postgres` user, which cannot enter
# a checkout under /root, and so that clones share the fetched Kafka jars.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPS_DIR="${INVOICE_DEPS_DIR:-/var/tmp/invoice-deps}"
PG_PORT="${INVOICE_PG_PORT:-5432}"
REDIS_PORT="${INVOICE_REDIS_PORT:-6379}"
KAFKA_PORT="${INVOICE_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${INVOICE_KAFKA_CONTROLLER_PORT:-9093}"
# A SASL/PLAIN listener for the tests of the service's Kafka authentication settings; its
# users are test fixtures, nothing else listens there.
KAFKA_SASL_PORT="${INVOICE_KAFKA_SASL_PORT:-9094}"
# A SASL_SSL listener (SCRAM-SHA-512 over TLS, the usual shape of a managed Kafka) whose
# certificate is signed by a throwaway CA made here: $KAFKA_TLS_DIR/ca.pem is what a client
# trusts. Test fixtures too.
KAFKA_SSL_PORT="${INVOICE_KAFKA_SSL_PORT:-9095}"
KAFKA_TLS_DIR="$DEPS_DIR/kafka-tls"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/kafka/pom.xml")"
KAFKA_HOME="$DEPS_DIR/kafka-$KAFKA_VERSION"
KAFKA_HEAP="${INVOICE_KAFKA_HEAP:--Xms256m -Xmx768m}"

log() { printf '[deps] %s\n' "$*" >&2; }
die() { printf '[deps] FAILED: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name seconds logfile command...
  local name=$1 secs=$2 logfile=$3; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      [[ -f $logfile ]] && tail -n 30 "$logfile" >&2
      die "$name did not answer within ${secs}s; its log is $logfile"
    fi
    sleep 0.2
  done
}

apt_install() {
  log "installing $* (Debian packages)"
  mkdir -p "$DEPS_DIR"
  if [[ ! -f /var/lib/apt/periodic/invoice-updated ]]; then
    apt-get update -qq >"$DEPS_DIR/apt.log" 2>&1 || die "apt-get update; its log is $DEPS_DIR/apt.log"
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/invoice-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >>"$DEPS_DIR/apt.log" 2>&1 || die "apt-get install $*; its log is $DEPS_DIR/apt.log"
}

# ---------------------------------------------------------------- PostgreSQL
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

pg_up() {
  local bin data="$DEPS_DIR/pg/data" logfile="$DEPS_DIR/pg/postgres.log"
  bin="$(pg_bin)"
  if [[ -z $bin || ! -x $bin/pg_ctl ]]; then
    apt_install postgresql postgresql-contrib
    # The Debian package may start its own cluster on our port; ours replaces it.
    command -v pg_ctlcluster >/dev/null && for c in /etc/postgresql/*/main; do
      [[ -d $c ]] && pg_ctlcluster "$(basename "$(dirname "$c")")" main stop 2>/dev/null || true
    done
    bin="$(pg_bin)"
  fi
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    log "postgres already running on 127.0.0.1:$PG_PORT"
  else
    mkdir -p "$DEPS_DIR/pg"
    chown postgres:postgres "$DEPS_DIR/pg"
    if [[ ! -s $data/PG_VERSION ]]; then
      log "initialising a PostgreSQL cluster in $data"
      runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 >"$DEPS_DIR/pg/initdb.log" 2>&1 \
        || die "initdb; its log is $DEPS_DIR/pg/initdb.log"
      cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DEPS_DIR/pg'
max_connections = 400
shared_buffers = 256MB
timezone = 'UTC'
EOF
    fi
    pg_tuning "$data" || true
    log "starting postgres on 127.0.0.1:$PG_PORT"
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$logfile" -w -t 60 start >/dev/null \
      || die "postgres did not start; its log is $logfile"
  fi
  wait_for postgres 60 "$logfile" "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
  if pg_tuning "$data"; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" reload >/dev/null || true
  fi
  local psql=("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt)
  if [[ "$("${psql[@]}" -c "select 1 from pg_database where datname = 'invoice'")" != 1 ]]; then
    "${psql[@]}" -c "create database invoice" >/dev/null || die "create database invoice"
  fi
}

# Settings kept in a file of their own (included from postgresql.conf) so that later changes
# reach clusters initialised earlier. Durability stays on (fsync, synchronous_commit): the
# benchmarks measure what production would see. WAL compression and fewer checkpoints cut
# the write volume of the stream's batch transactions; lz4 where the server takes it (built
# with lz4, version 15 or later), as pglz compressing full-page images took 5% of Postgres'
# CPU while issuing. Returns 0 if the file changed.
pg_tuning() {
  local data=$1 method=on configure version
  configure="$("$(pg_bin)/pg_config" --configure 2>/dev/null || true)"
  version="$("$(pg_bin)/pg_config" --version 2>/dev/null | grep -oE '[0-9]+' | head -n 1 || true)"
  [[ $configure == *--with-lz4* && ${version:-0} -ge 15 ]] && method=lz4
  local want="wal_compression = $method"$'\nmax_wal_size = 4GB\ncheckpoint_timeout = 15min\nwal_buffers = 16MB'
  grep -q "include_if_exists = 'invoice.conf'" "$data/postgresql.conf" 2>/dev/null \
    || echo "include_if_exists = 'invoice.conf'" >>"$data/postgresql.conf"
  if [[ "$(cat "$data/invoice.conf" 2>/dev/null)" != "$want" ]]; then
    printf '%s\n' "$want" >"$data/invoice.conf"
    chown postgres:postgres "$data/invoice.conf"
    return 0
  fi
  return 1
}

pg_down() {
  local bin data="$DEPS_DIR/pg/data"
  bin="$(pg_bin)"
  [[ -n $bin && -s $data/postmaster.pid ]] || return 0
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
  log "postgres stopped"
}

# ---------------------------------------------------------------- Redis
redis_up() {
  local logfile="$DEPS_DIR/redis/redis.log"
  command -v redis-server >/dev/null || apt_install redis-server
  # The Debian package may have started a daemon of its own; keep ours alone on the port.
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    log "redis already running on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  mkdir -p "$DEPS_DIR/redis"
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  # appendonly: a Redis restart keeps the queue, as production should (SPEC §1 still holds
  # without it: the sweeper re-enqueues from Postgres).
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --dir "$DEPS_DIR/redis" --logfile "$logfile" --pidfile "$DEPS_DIR/redis/redis.pid" \
    --appendonly yes --appendfsync everysec --save "" --protected-mode yes \
    || die "redis did not start; its log is $logfile"
  wait_for redis 30 "$logfile" bash -c "redis-cli -h 127.0.0.1 -p $REDIS_PORT ping | grep -q PONG"
}

redis_down() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 && log "redis stopped" || true
}

# ---------------------------------------------------------------- Kafka
kafka_fetch() {
  [[ -f $KAFKA_HOME/libs/.complete ]] && return 0
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME/libs"
  mkdir -p "$KAFKA_HOME/libs"
  mvn -q -B -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_HOME/libs" -DincludeScope=runtime >"$KAFKA_HOME/mvn.log" 2>&1 \
    || die "fetching the Kafka jars; its log is $KAFKA_HOME/mvn.log"
  touch "$KAFKA_HOME/libs/.complete"
}

kafka_ready() {
  port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$KAFKA_HOME/server.log" 2>/dev/null
}

kafka_up() {
  local logfile="$KAFKA_HOME/server.log"
  kafka_fetch
  kafka_tls
  if port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_PORT" && port_open "$KAFKA_SSL_PORT"; then
    log "kafka already running on 127.0.0.1:$KAFKA_PORT"
    kafka_scram_user
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    log "kafka runs without the SASL or SASL_SSL listener (started by an older deps.sh); restarting it"
    kafka_down
    local deadline=$((SECONDS + 30))
    while port_open "$KAFKA_PORT" && ((SECONDS < deadline)); do sleep 0.2; done
    port_open "$KAFKA_PORT" && die "a Kafka this script did not start (no pid in $KAFKA_HOME/kafka.pid) holds 127.0.0.1:$KAFKA_PORT without the SASL listener on $KAFKA_SASL_PORT and the SASL_SSL one on $KAFKA_SSL_PORT; stop it and run make deps again"
  fi
  local props="$KAFKA_HOME/server.properties" data="$KAFKA_HOME/data"
  cat >"$props" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SSL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_invoice-test="invoice-test-password";
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_TLS_DIR/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=invoice-test
log.dirs=$data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
EOF
  cat >"$KAFKA_HOME/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $logfile
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
EOF
  local java=(java -cp "$KAFKA_HOME/libs/*" -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties")
  if [[ ! -f $data/meta.properties ]]; then
    log "formatting KRaft storage in $data"
    mkdir -p "$data"
    local cluster_id
    cluster_id="$("${java[@]}" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_HOME/format.log")" \
      || die "kafka random-uuid; its log is $KAFKA_HOME/format.log"
    "${java[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$props" \
      >>"$KAFKA_HOME/format.log" 2>&1 || die "formatting kafka storage; its log is $KAFKA_HOME/format.log"
  fi
  : >"$logfile"
  log "starting kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT"
  # setsid: the broker outlives this script and the make that ran it.
  # shellcheck disable=SC2086
  setsid nohup "${java[@]}" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true kafka.Kafka "$props" >"$KAFKA_HOME/stdout.log" 2>&1 </dev/null &
  echo $! >"$KAFKA_HOME/kafka.pid"
  wait_for kafka 120 "$logfile" kafka_ready
  kafka_scram_user
}

# The CA and the broker's certificate (127.0.0.1 and localhost) of the SASL_SSL listener,
# made once; a CA that has expired or lost its key is made afresh with everything it signed.
kafka_tls() {
  local dir=$KAFKA_TLS_DIR
  if [[ -f $dir/broker.p12 ]] && openssl x509 -checkend 86400 -noout -in "$dir/ca.pem" >/dev/null 2>&1 \
    && openssl x509 -checkend 86400 -noout -in "$dir/broker.pem" >/dev/null 2>&1; then
    return 0
  fi
  log "making a test CA and the broker's TLS certificate in $dir"
  command -v openssl >/dev/null || apt_install openssl
  rm -rf "$dir" && mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=invoice local test CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile broker.ext -out broker.pem
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -passout pass:invoice-test -out broker.p12
    chmod 644 ca.pem
  ) >"$DEPS_DIR/kafka-tls.log" 2>&1 || die "making the test TLS certificates; its log is $DEPS_DIR/kafka-tls.log"
  # A running broker holds the old certificate: restart it.
  if port_open "$KAFKA_SSL_PORT"; then kafka_down; fi
}

# The SCRAM-SHA-512 user of the SASL_SSL listener. KRaft keeps SCRAM credentials in its
# metadata log, so they are written once per formatted storage (the marker lives there).
kafka_scram_user() {
  local marker="$KAFKA_HOME/data/.invoice-scram-user"
  [[ -f $marker ]] && return 0
  java -cp "$KAFKA_HOME/libs/*" -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --alter \
    --entity-type users --entity-name invoice-test \
    --add-config 'SCRAM-SHA-512=[iterations=4096,password=invoice-test-password]' \
    >>"$KAFKA_HOME/scram.log" 2>&1 || die "creating the SCRAM user; its log is $KAFKA_HOME/scram.log"
  touch "$marker"
}

kafka_down() {
  local pidfile="$KAFKA_HOME/kafka.pid"
  [[ -f $pidfile ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    log "kafka stopped"
  fi
  rm -f "$pidfile"
}

status() {
  local bin; bin="$(pg_bin)"
  if [[ -n $bin ]] && "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then echo "postgres: up (127.0.0.1:$PG_PORT)"; else echo "postgres: down"; fi
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then echo "redis: up (127.0.0.1:$REDIS_PORT)"; else echo "redis: down"; fi
  if port_open "$KAFKA_PORT"; then echo "kafka: up (127.0.0.1:$KAFKA_PORT)"; else echo "kafka: down"; fi
}

# ---------------------------------------------------------------- build
# librdkafka is built with TLS (Kafka over SSL, SASL/SCRAM) against the system's OpenSSL.
build_deps() {
  if ! command -v pkg-config >/dev/null || ! pkg-config --exists openssl; then
    apt_install libssl-dev pkg-config
  fi
}

case "${1:-up}" in
  up)
    mkdir -p "$DEPS_DIR"
    chmod 755 "$DEPS_DIR"
    build_deps
    # Kafka's first start is the slowest; fetch its jars while the others start.
    kafka_fetch &
    fetch_pid=$!
    pg_up
    redis_up
    wait "$fetch_pid" || die "fetching the Kafka jars; its log is $KAFKA_HOME/mvn.log"
    kafka_up
    log "ready: postgres 127.0.0.1:$PG_PORT, redis 127.0.0.1:$REDIS_PORT, kafka 127.0.0.1:$KAFKA_PORT (SASL/PLAIN :$KAFKA_SASL_PORT, SASL_SSL :$KAFKA_SSL_PORT)"
    ;;
  build) build_deps ;;
  down) kafka_down; redis_down; pg_down ;;
  status) status ;;
  *) die "usage: $0 up|build|down|status" ;;
esac

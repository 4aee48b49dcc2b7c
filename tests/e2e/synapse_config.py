"""Writes the end-to-end suite's Synapse config, using `synapse-edge
generate` for everything about workers (so real Synapse proves the
generated files), plus a homeserver.yaml for what only a test server has.

Topology (the guide's shape): main, client_sync1 (account_data, presence,
receipts, to_device, typing writer; user directory), rooms1, rooms2,
federation_reader1, media1 (media repository, quarantine writer), sender1,
tasks1 (events writer, background tasks, pushers, appservices). Routed
workers listen on inbound Unix sockets with x_forwarded; writers have
replication sockets in instance_map; every worker has a metrics port.

Usage: synapse_config.py DIR EDGE_BINARY
Writes DIR/homeserver.yaml, DIR/topology.yaml and DIR/gen/ (generated).
"""

import subprocess
import sys
from pathlib import Path

SERVER_NAME = "e2e.test"
METRICS_BASE = 19100

TOPOLOGY = """server_name: {server}
sockets: {d}/sockets
config_dir: {d}/gen
log_dir: {d}/logs
log_retention_days: 1
metrics_base_port: {metrics}
workers:
  client_sync: 1
  rooms: 2
  federation_reader: 1
  media: 1
  sender: 1
  tasks: 1
stream_writers:
  account_data: [client_sync1]
  events: [tasks1]
  presence: [client_sync1]
  receipts: [client_sync1]
  to_device: [client_sync1]
  typing: [client_sync1]
background_tasks: tasks1
pushers: [tasks1]
appservice_notifications: tasks1
user_directory: client_sync1
media_background_jobs: media1
"""


def listener(path: str, resources, x_forwarded=False) -> str:
    xf = "\n    x_forwarded: true" if x_forwarded else ""
    return (
        f"  - path: \"{path}\"\n    type: http{xf}\n"
        f"    resources:\n      - names: [{', '.join(resources)}]\n        compress: false\n"
    )


def main(d: Path, edge: str) -> None:
    for sub in ("sockets", "logs", "media"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "topology.yaml").write_text(TOPOLOGY.format(server=SERVER_NAME, d=d, metrics=METRICS_BASE))
    subprocess.run([edge, "generate", "--topology", str(d / "topology.yaml"), "--out", str(d / "gen")],
                   check=True, stdout=subprocess.DEVNULL)
    # Main logs to its own file, unbuffered, so failures show at once.
    (d / "main.log.config").write_text(f"""version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {d / 'logs' / 'main.log'}
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
""")
    rl = "{per_second: 1000, burst_count: 1000}"
    sock = lambda kind: d / "sockets" / f"synapse_{kind}_main.sock"
    hs = f"""# The end-to-end suite's homeserver.yaml; the worker section is generated.
server_name: "{SERVER_NAME}"
pid_file: "{d / 'main.pid'}"
public_baseurl: "http://127.0.0.1/"
report_stats: false
enable_metrics: true
signing_key_path: "{d / 'signing.key'}"
media_store_path: "{d / 'media'}"
log_config: "{d / 'main.log.config'}"
macaroon_secret_key: "e2e-macaroon-secret"
form_secret: "e2e-form-secret"
registration_shared_secret: "e2e-registration-secret"
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
url_preview_enabled: false
max_event_delay_duration: 1h
experimental_features:
  msc3266_enabled: true
  msc4306_enabled: true
  msc3391_enabled: true
database:
  name: psycopg2
  args:
    user: postgres
    database: synapse
    host: "{d / 'pgsock'}"
    cp_min: 1
    cp_max: 4
listeners:
{listener(str(sock('inbound')), ['client', 'federation'], x_forwarded=True)}{listener(str(sock('replication')), ['replication'])}  - type: metrics
    bind_address: '127.0.0.1'
    port: {METRICS_BASE}
"""
    for key in ("rc_message", "rc_registration", "rc_room_creation", "rc_media_create",
                "rc_joins_per_room", "rc_3pid_validation", "rc_delayed_event_mgmt"):
        hs += f"{key}: {rl}\n"
    hs += f"rc_login: {{address: {rl}, account: {rl}, failed_attempts: {rl}}}\n"
    hs += f"rc_joins: {{local: {rl}, remote: {rl}}}\n"
    hs += f"rc_invites: {{per_room: {rl}, per_user: {rl}, per_issuer: {rl}}}\n"
    hs += f"rc_presence: {{per_user: {rl}}}\n"
    (d / "homeserver.yaml").write_text(hs)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2])

"""Writes a Synapse config in the guide's shape for the end-to-end suite.

main, client_sync1 (account_data, presence, receipts, to_device, typing
writer and user directory), rooms1, rooms2, federation_reader1, media1
(media repository), sender1 (federation sender), tasks1 (events writer,
background tasks, pushers). Routed workers listen on inbound Unix sockets
with x_forwarded; writers have replication sockets in instance_map.

Usage: synapse_config.py DIR
"""

import sys
from pathlib import Path

SERVER_NAME = "e2e.test"

# name: (replication socket?, inbound resources or None)
WORKERS = {
    "client_sync1": (True, ["client", "federation"]),
    "rooms1": (False, ["client", "federation"]),
    "rooms2": (False, ["client", "federation"]),
    "federation_reader1": (False, ["client", "federation"]),
    "media1": (True, ["media", "client", "federation"]),
    "sender1": (True, None),
    "tasks1": (True, None),
}

# Rate limits relaxed: the flows send bursts no real user would.
RELAXED = {"per_second": 1000, "burst_count": 1000}


def sock(d: Path, kind: str, name: str) -> str:
    return str(d / "sockets" / f"synapse_{kind}_{name}.sock")


def listener(path: str, resources, x_forwarded=False) -> str:
    xf = "\n    x_forwarded: true" if x_forwarded else ""
    return (
        f"  - path: \"{path}\"\n    type: http{xf}\n"
        f"    resources:\n      - names: [{', '.join(resources)}]\n        compress: false\n"
    )


def log_config(d: Path, name: str) -> str:
    path = d / "log.config" / f"{name}.log.config"
    path.write_text(
        f"""version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {d / 'logs' / (name + '.log')}
    encoding: utf8
loggers:
  synapse.access:
    level: INFO
  synapse.storage.SQL:
    level: WARN
  twisted:
    level: WARN
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""
    )
    return str(path)


def main(d: Path) -> None:
    for sub in ("sockets", "workers", "logs", "log.config", "media"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    writers = ["account_data", "presence", "receipts", "to_device", "typing"]
    rl = "{per_second: 1000, burst_count: 1000}"
    hs = f"""# Generated for synapse-edge's end-to-end suite.
server_name: "{SERVER_NAME}"
pid_file: "{d / 'main.pid'}"
public_baseurl: "http://127.0.0.1/"
report_stats: false
signing_key_path: "{d / 'signing.key'}"
media_store_path: "{d / 'media'}"
log_config: "{log_config(d, 'main')}"
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
redis:
  enabled: true
  path: "{d / 'redis.sock'}"
listeners:
{listener(sock(d, 'inbound', 'main'), ['client', 'federation'], x_forwarded=True)}{listener(sock(d, 'replication', 'main'), ['replication'])}
enable_media_repo: false
federation_sender_instances: [sender1]
media_instance_running_background_jobs: media1
notify_appservices_from_worker: tasks1
pusher_instances: [tasks1]
run_background_tasks_on: tasks1
start_pushers: false
update_user_directory_from_worker: client_sync1
stream_writers:
  events: [tasks1]
  # The media worker serves /quarantine_media, so it must write this stream.
  quarantined_media_changes: [media1]
""" + "".join(f"  {s}: [client_sync1]\n" for s in writers) + "instance_map:\n"
    for name in ["main"] + [n for n, (rep, _) in WORKERS.items() if rep]:
        hs += f"  {name}:\n    path: \"{sock(d, 'replication', name)}\"\n"
    for key in ("rc_message", "rc_registration", "rc_room_creation", "rc_media_create",
                "rc_joins_per_room", "rc_3pid_validation", "rc_delayed_event_mgmt"):
        hs += f"{key}: {rl}\n"
    hs += f"rc_login: {{address: {rl}, account: {rl}, failed_attempts: {rl}}}\n"
    hs += f"rc_joins: {{local: {rl}, remote: {rl}}}\n"
    hs += f"rc_invites: {{per_room: {rl}, per_user: {rl}, per_issuer: {rl}}}\n"
    hs += f"rc_presence: {{per_user: {rl}}}\n"
    (d / "homeserver.yaml").write_text(hs)

    for name, (rep, inbound) in WORKERS.items():
        w = (
            "worker_app: synapse.app.generic_worker\n"
            f"worker_name: {name}\n"
            f"worker_log_config: \"{log_config(d, name)}\"\n"
        )
        if name == "media1":
            w += "enable_media_repo: true\n"
        w += "worker_listeners:\n"
        if rep:
            w += listener(sock(d, "replication", name), ["replication"])
        if inbound:
            w += listener(sock(d, "inbound", name), inbound, x_forwarded=True)
        (d / "workers" / f"{name}.yaml").write_text(w)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())

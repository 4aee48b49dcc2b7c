# Sourced by scripts that run `synapse-edge demo` in the background.
# demo_config_dir LOG: waits for the demo whose output goes to LOG to say
# where it wrote the Synapse config it serves, and prints that directory;
# fails, showing LOG, if it does not within 10 s.
demo_config_dir() {
  local dir=""
  for _ in $(seq 100); do
    dir=$(sed -n 's/^Synapse config: \(.*\)\/homeserver.yaml and .*/\1/p' "$1")
    if [ -n "$dir" ]; then
      echo "$dir"
      return 0
    fi
    sleep 0.1
  done
  echo "the demo did not start:" >&2
  cat "$1" >&2
  return 1
}

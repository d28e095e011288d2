#!/bin/bash
# End-to-end check of a site's per-message cost (bench/RESULTS.md 7): the README one-machine trial
# (fedseg certs / server / supernode register / site join x2 / flwr run, 3 rounds) in a fresh folder.
# Usage: bench/deployment_trial.sh --warm-worker|--no-warm-worker BASE_PORT [FOLDER]; prints each round's
# seconds (history.json) beside the sites' own work seconds. Run from the repository, its venv active.
set -u
FLAG=$1; PORT=$2
REPO=$(cd "$(dirname "$0")/.." && pwd); ROOT=${3:-$(mktemp -d)}/trial$FLAG; rm -rf $ROOT; mkdir -p $ROOT; cd $ROOT
export FLWR_HOME=$ROOT/flwr-home FEDSEG_CACHE=$ROOT/cache OMP_NUM_THREADS=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p app $FLWR_HOME; cp "$REPO/pyproject.toml" "$REPO/.gitignore" app/; for d in fedseg clients strategies configs; do cp -r "$REPO/$d" app/; done
export PYTHONPATH=$ROOT/app
fedseg synth data --size tiny --sites 2 >/dev/null
fedseg certs certs --host localhost --site site-a --site site-b >/dev/null
fedseg server --certs certs --port $PORT > superlink.log 2>&1 & SERVER=$!
until grep -q "starting its SuperExec" superlink.log; do sleep 2; done
printf '[superlink.fedseg]\naddress = "localhost:%s"\nroot-certificates = "%s/certs/ca.crt"\n' $PORT $ROOT > $FLWR_HOME/config.toml
flwr supernode register certs/sites/site-a/auth.pub fedseg --name site-a >/dev/null
flwr supernode register certs/sites/site-b/auth.pub fedseg --name site-b >/dev/null
fedseg site join --superlink localhost:$PORT --data-dir data/site-0 --name site-a --site-id 0 --ca certs/ca.crt --auth-key certs/sites/site-a/auth.key --local-port $((PORT+2)) $FLAG > site-a.log 2>&1 & A=$!
fedseg site join --superlink localhost:$PORT --data-dir data/site-1 --name site-b --site-id 1 --ca certs/ca.crt --auth-key certs/sites/site-b/auth.key --local-port $((PORT+3)) $FLAG > site-b.log 2>&1 & B=$!
if [ "$FLAG" = "--warm-worker" ]; then until grep -q "site worker ready" site-a.log && grep -q "site worker ready" site-b.log; do sleep 2; done; else sleep 20; fi
cd app; START=$(date +%s); flwr run . fedseg --stream --run-config "num-server-rounds=3 local-epochs=1 in-channels=1 patch-size='24,24,24' min-sites=2 output-dir='$ROOT/runs'" > ../run.log 2>&1; echo "run exit $? wall $(( $(date +%s) - START )) s" >> ../run.log; cd ..
for p in $A $B $SERVER; do kill $p; done; sleep 5
python - <<PY
import json, glob
h = json.load(open(glob.glob("$ROOT/runs/*/history.json")[0]))
for r in h["rounds"]:
    work = sum(v.get("train-seconds", 0) for v in r["train"].values()) + sum(v.get("eval-seconds", 0) for v in r["eval"].values())
    print("$FLAG", "round", r["round"], "seconds", round(r["seconds"], 1), "site work s (sum)", round(work, 1))
PY
tail -1 run.log

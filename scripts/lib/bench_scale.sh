# shellcheck shell=bash
#
# The scale phase of scripts/bench (`scripts/bench --scale`; method, targets and figures
# in docs/benchmarks.md). Sourced by scripts/bench, which sets the service up (private
# servers, a fresh database, `crm serve`, CRM_BENCH_TOKEN) and then calls scale_phase.
#
# One organisation grows through POST /v1/contacts in steps; before the first step, a
# few contacts get long streams and a second staff user does a few things. At each step,
# once the projectors have drained: p50/p95 of every documented read, write throughput
# of the step's growth, `crm serve` RSS, bytes per event on disk, and `crm rebuild`
# (contacts, activity) time, rate and peak RSS. One Markdown table at the end, with the
# growth factor from the first step to the last and the targets.
#
# Settings (environment):
#   BENCH_SCALE_STEPS        contacts after each step ("50000 250000 1000000")
#   BENCH_SCALE_LONG_EVENTS  changes to each of the 3 long contacts (2000)
#   BENCH_SCALE_CONNECTIONS  connections that post contacts (32)
#   BENCH_SCALE_WARMUP       warm-up requests per read, not measured (20)
#   BENCH_SCALE_REQUESTS     measured requests per read, one at a time (200)

# scale_settings: read and check the settings (before anything is built or started).
scale_settings() {
    local s prev=0
    read -r -a SCALE_STEPS <<<"${BENCH_SCALE_STEPS:-50000 250000 1000000}"
    ((${#SCALE_STEPS[@]} > 0)) || die "BENCH_SCALE_STEPS is empty"
    for s in "${SCALE_STEPS[@]}"; do
        if ! [[ $s =~ ^[0-9]+$ ]] || ((s <= prev)); then
            die "BENCH_SCALE_STEPS must be increasing whole numbers of contacts, not '${BENCH_SCALE_STEPS:-}'"
        fi
        ((s - prev >= 100)) || die "BENCH_SCALE_STEPS: each step must add at least 100 contacts"
        prev=$s
    done
    SCALE_LONG_EVENTS=${BENCH_SCALE_LONG_EVENTS:-2000}
    SCALE_CONNECTIONS=${BENCH_SCALE_CONNECTIONS:-32}
    SCALE_WARMUP=${BENCH_SCALE_WARMUP:-20}
    SCALE_REQUESTS=${BENCH_SCALE_REQUESTS:-200}
    for s in SCALE_LONG_EVENTS SCALE_CONNECTIONS SCALE_WARMUP SCALE_REQUESTS; do
        [[ ${!s} =~ ^[0-9]+$ ]] || die "BENCH_${s}=${!s}: expected a whole number"
    done
    ((SCALE_LONG_EVENTS >= 20 && SCALE_CONNECTIONS >= 1 && SCALE_REQUESTS >= 20)) ||
        die "BENCH_SCALE_LONG_EVENTS must be at least 20, BENCH_SCALE_CONNECTIONS 1, BENCH_SCALE_REQUESTS 20"
    SCALE_COMMAND="BENCH_SCALE_STEPS=\"${SCALE_STEPS[*]}\" BENCH_SCALE_LONG_EVENTS=$SCALE_LONG_EVENTS BENCH_SCALE_CONNECTIONS=$SCALE_CONNECTIONS BENCH_SCALE_WARMUP=$SCALE_WARMUP BENCH_SCALE_REQUESTS=$SCALE_REQUESTS scripts/bench --scale"
}

# kv KEY LINE: the value of key=value field KEY in LINE.
kv() { sed -n "s/.*\(^\| \)$1=\([^ ]*\).*/\2/p" <<<"$2"; }

# scale_bg OUTFILE CMD...: run CMD in the background in a session of its own (so that
# the EXIT trap stops it with whatever it started, e.g. `crm rebuild` under
# /usr/bin/time), stdout to OUTFILE, stderr to OUTFILE.err; wait for it. Returns its
# status. With SCALE_POLL_HWM set, also polls the peak RSS (VmHWM) of CMD every 50 ms
# into SCALE_HWM_KIB.
scale_bg() {
    local out=$1 rc=0 hwm
    shift
    setsid "$@" >"$out" 2>"$out.err" 8>&- &
    BG_PID=$!
    BG_GROUP=$BG_PID
    SCALE_HWM_KIB=0
    if [[ -n ${SCALE_POLL_HWM:-} ]]; then
        while kill -0 "$BG_PID" 2>/dev/null; do
            hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$BG_PID/status" 2>/dev/null || true)
            if [[ $hwm =~ ^[0-9]+$ ]] && ((hwm > SCALE_HWM_KIB)); then SCALE_HWM_KIB=$hwm; fi
            sleep 0.05
        done
    fi
    wait "$BG_PID" || rc=$?
    # shellcheck disable=SC2034 # scripts/bench's EXIT trap reads them
    BG_PID="" BG_GROUP=""
    return "$rc"
}

scale_now() { date +%s.%N; }
# calc EXPR [VAR=VALUE...]: awk arithmetic, printed.
calc() {
    local expr=$1
    shift
    local -a vars=()
    local v
    for v in "$@"; do vars+=(-v "$v"); done
    awk "${vars[@]}" "BEGIN { $expr }"
}

# scale_rebuild NAME STEP: `crm rebuild NAME` while `crm serve` runs; wall time, the
# events/s it prints and its peak RSS into RB_<field>[NAME:STEP]. The peak RSS comes
# from the command's own last line (`…, peak RSS M MiB`) when it prints one, else from
# GNU time (%M), else from polling /proc.
scale_rebuild() {
    local name=$1 step=$2 t0 t1 line rss="" rate rc=0
    local -a cmd=("$TARGET/crm" rebuild "$name")
    local SCALE_POLL_HWM=""
    if [[ -n $GNU_TIME ]]; then
        cmd=("$GNU_TIME" -f 'peak_rss_kib=%M' -o "$WORK/rebuild.time" "${cmd[@]}")
    else
        SCALE_POLL_HWM=1
    fi
    log "crm rebuild $name"
    t0=$(scale_now)
    scale_bg "$WORK/rebuild.out" "${cmd[@]}" || rc=$?
    t1=$(scale_now)
    line=$(tail -1 "$WORK/rebuild.out")
    if ((rc != 0)); then
        log "warning: crm rebuild $name failed ($rc): $(tail -3 "$WORK/rebuild.out.err")"
        RB_SECS[$name:$step]=na RB_RATE[$name:$step]=na RB_RSS[$name:$step]=na RB_SRC[$name]=failed
        return 0
    fi
    rate=$(sed -n 's/.*(\([0-9.]*\) events\/s).*/\1/p' <<<"$line")
    rss=$(sed -n 's/.*peak RSS \([0-9.]*\) MiB.*/\1/p' <<<"$line")
    if [[ -n $rss ]]; then
        RB_SRC[$name]="its own report"
    elif [[ -n $GNU_TIME ]]; then
        rss=$(calc 'printf "%.0f", k / 1024' "k=$(sed -n 's/^peak_rss_kib=//p' "$WORK/rebuild.time")")
        RB_SRC[$name]="GNU time"
    else
        rss=$(calc 'printf "%.0f", k / 1024' "k=$SCALE_HWM_KIB")
        RB_SRC[$name]="VmHWM polled every 50 ms"
    fi
    RB_SECS[$name:$step]=$(calc 'printf "%.2f", b - a' "a=$t0" "b=$t1")
    RB_RATE[$name:$step]=${rate:-na}
    RB_RSS[$name:$step]=${rss:-na}
    log "  $line; peak RSS ${rss:-?} MiB (${RB_SRC[$name]})"
}

# The reads, in the table's order: KEY|LABEL|PATH|PARAM|PARAM… (PARAM key=value,
# percent-encoded by crm-bench). Uses the seed's and the step's figures.
scale_reads() {
    local long=${LONG_IDS%%,*}
    cat <<READS
c_first|GET /v1/contacts (first page)|/v1/contacts
c_deep|GET /v1/contacts?after= (a page 90 % deep)|/v1/contacts|after=$DEEP_ID
c_email|GET /v1/contacts?email= (exact, one hit)|/v1/contacts|email=$SAMPLE_EMAIL
c_company|GET /v1/contacts?company=&limit=5 (a page as full at every step)|/v1/contacts|company=$SAMPLE_COMPANY|limit=5
c_q_rare|GET /v1/contacts?q= rare (\`zyzzyva\`, 5 hits per step)|/v1/contacts|q=zyzzyva
c_q_common|GET /v1/contacts?q= common (\`son\`, ~1 in 8)|/v1/contacts|q=son
c_q_address|GET /v1/contacts?q= one whole address (one hit; its trigrams are common)|/v1/contacts|q=$SAMPLE_EMAIL
c_archived|GET /v1/contacts?archived=true (10 per step)|/v1/contacts|archived=true
c_updated|GET /v1/contacts?updated_since= (the step's 5 markers)|/v1/contacts|updated_since=$UPDATED_SINCE
get|GET /v1/contacts/{id}|/v1/contacts/$SAMPLE_ID
history|GET /v1/contacts/{id}/history?limit=50 (long contact)|/v1/contacts/$long/history|limit=50
as_of|GET /v1/contacts/{id}?as_of= (middle of a long stream)|/v1/contacts/$long|as_of=$AS_OF
a_all|GET /v1/activity|/v1/activity
a_action_rare|GET /v1/activity?action=ContactArchived (rare)|/v1/activity|action=ContactArchived
a_action_common|GET /v1/activity?action=ContactCreated (common)|/v1/activity|action=ContactCreated
a_actor_rare|GET /v1/activity?actor_id= (second user, rare)|/v1/activity|actor_id=$SECOND_ID
a_actor_common|GET /v1/activity?actor_id= (owner, common)|/v1/activity|actor_id=$OWNER_ID
a_entity_type|GET /v1/activity?entity_type=contact|/v1/activity|entity_type=contact
a_entity_id|GET /v1/activity?entity_id= (long contact)|/v1/activity|entity_id=$long
a_window|GET /v1/activity?since=&until= (10 % of the long streams' changes)|/v1/activity|since=$WINDOW_SINCE|until=$WINDOW_UNTIL
READS
}

# scale_measure_reads STEP: every read, WARMUP + REQUESTS sequential requests each.
scale_measure_reads() {
    local step=$1 spec key label path out p
    local -a f params
    READ_KEYS=()
    while IFS= read -r spec; do
        IFS='|' read -r -a f <<<"$spec"
        key=${f[0]} label=${f[1]} path=${f[2]}
        params=()
        for p in "${f[@]:3}"; do params+=(--param "$p"); done
        READ_KEYS+=("$key")
        READ_LABEL[$key]=$label
        if scale_bg "$WORK/read.out" "$TARGET/crm-bench" read --url "$URL" --path "$path" \
            "${params[@]}" --warmup "$SCALE_WARMUP" --requests "$SCALE_REQUESTS"; then
            out=$(<"$WORK/read.out")
        else
            log "warning: crm-bench read failed for $label: $(tail -2 "$WORK/read.out.err")"
            out="errors=$((SCALE_WARMUP + SCALE_REQUESTS)) first_error=crm-bench p50_ms=na p95_ms=na items=na"
        fi
        R_P50[$key:$step]=$(kv p50_ms "$out")
        R_P95[$key:$step]=$(kv p95_ms "$out")
        R_ERR[$key:$step]=$(kv errors "$out")
        R_ERRST[$key:$step]=$(kv first_error "$out")
        R_ITEMS[$key:$step]=$(kv items "$out")
        log "  $label: p50 ${R_P50[$key:$step]} ms, p95 ${R_P95[$key:$step]} ms, ${R_ITEMS[$key:$step]} items, errors ${R_ERR[$key:$step]}"
        if [[ ${R_ERR[$key:$step]} != 0 && -s $WORK/read.out.err ]]; then
            log "    $(head -1 "$WORK/read.out.err")"
        fi
    done < <(scale_reads)
}

# scale_error FIRST_ERROR: "HTTP 400" for a status, else what crm-bench said ("io").
scale_error() { if [[ $1 =~ ^[0-9]+$ ]]; then printf 'HTTP %s' "$1"; else printf '%s' "$1"; fi; }

# growth FIRST LAST: "×N.NN" (LAST / FIRST), or "—" when either is not a number.
growth() {
    if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] && calc 'exit !(a > 0)' "a=$1"; then
        calc 'printf "×%.2f", b / a' "a=$1" "b=$2"
    else
        printf '—'
    fi
}
# within FIRST LAST OP LIMIT: PASS when LAST/FIRST OP LIMIT (<= or >=), else FAIL.
within() {
    if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] && calc 'exit !(a > 0)' "a=$1" &&
        calc 'g = b / a; exit !((op == "<=") ? (g <= l + 1e-9) : (g >= l - 1e-9))' \
            "a=$1" "b=$2" "op=$3" "l=$4"; then
        printf PASS
    else
        printf FAIL
    fi
}

scale_phase() {
    local i step prev=0 line seed n_steps=${#SCALE_STEPS[@]} started
    declare -gA R_P50 R_P95 R_ERR R_ERRST R_ITEMS READ_LABEL RB_SECS RB_RATE RB_RSS RB_SRC
    declare -ga READ_KEYS W_RATE W_ERR W_P50 SERVE_RSS EVENTS BPE STEP_SECS
    started=$(scale_now)
    GNU_TIME=""
    if [[ -x /usr/bin/time ]] && /usr/bin/time -f %M -o /dev/null true 2>/dev/null; then
        GNU_TIME=/usr/bin/time
    fi

    log "scale: 3 long contacts of $SCALE_LONG_EVENTS changes each, and a second user"
    scale_bg "$WORK/seed.out" "$TARGET/crm-bench" scale-seed --url "$URL" \
        --long-contacts 3 --long-events "$SCALE_LONG_EVENTS" ||
        die "crm-bench scale-seed failed: $(tail -3 "$WORK/seed.out.err")"
    seed=$(<"$WORK/seed.out")
    log "  $seed"
    ORG_ID=$(kv org_id "$seed")
    OWNER_ID=$(kv owner_id "$seed")
    SECOND_ID=$(kv second_user_id "$seed")
    LONG_IDS=$(kv long_ids "$seed")
    AS_OF=$(kv as_of "$seed")
    WINDOW_SINCE=$(kv window_since "$seed")
    WINDOW_UNTIL=$(kv window_until "$seed")
    [[ $ORG_ID =~ ^[0-9a-f-]{36}$ && -n $AS_OF && -n $WINDOW_UNTIL ]] ||
        die "crm-bench scale-seed printed no ids: $seed"
    SEED_ERRORS=$(kv errors "$seed")

    for ((i = 0; i < n_steps; i++)); do
        step=${SCALE_STEPS[$i]}
        local t0
        t0=$(scale_now)
        log "scale step $((i + 1))/$n_steps: contacts $prev..$step over $SCALE_CONNECTIONS connections"
        scale_bg "$WORK/grow.out" "$TARGET/crm-bench" scale-grow --url "$URL" --from "$prev" \
            --to "$step" --connections "$SCALE_CONNECTIONS" ||
            die "crm-bench scale-grow failed: $(tail -3 "$WORK/grow.out.err")"
        line=$(<"$WORK/grow.out")
        log "  $line"
        W_RATE[i]=$(kv contacts_per_s "$line")
        W_P50[i]=$(kv p50_ms "$line")
        W_ERR[i]=$(($(kv errors "$line") + $(kv extra_errors "$line")))
        UPDATED_SINCE=$(kv updated_since "$line")
        # The same contact for `email=`, `company=` and the single read at every step.
        if ((i == 0)); then
            SAMPLE_ID=$(kv sample_id "$line")
            SAMPLE_EMAIL=$(kv sample_email "$line")
            SAMPLE_COMPANY=$(kv sample_company "$line")
            SAMPLE_COMPANY=${SAMPLE_COMPANY//_/ }
        fi
        log "  waiting for the projectors to drain"
        wait_drained
        # What autovacuum would have done by now on a live system, done at a known time
        # rather than during the reads.
        "$PSQL" -q "$DATABASE_URL" -c "VACUUM ANALYZE" -c "CHECKPOINT" ||
            log "warning: could not vacuum and checkpoint before the reads (needs a superuser)"
        DEEP_ID=$("$PSQL" -At "$DATABASE_URL" -c "SELECT id FROM contacts
            WHERE org_id = '$ORG_ID' AND NOT archived ORDER BY id
            OFFSET (SELECT count(*) * 9 / 10 FROM contacts WHERE org_id = '$ORG_ID' AND NOT archived)
            LIMIT 1")
        log "  reads: $SCALE_WARMUP warm-up + $SCALE_REQUESTS measured requests each, one at a time"
        scale_measure_reads "$i"
        SERVE_RSS[i]=$(awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$CRM_PID/status" 2>/dev/null || echo na)
        IFS='|' read -r "EVENTS[i]" "BPE[i]" < <("$PSQL" -At "$DATABASE_URL" -c \
            "SELECT count(*), round(pg_total_relation_size('events')::numeric / greatest(count(*), 1)) FROM events")
        scale_rebuild contacts "$i"
        scale_rebuild activity "$i"
        STEP_SECS[i]=$(calc 'printf "%.0f", b - a' "a=$t0" "b=$(scale_now)")
        log "  step took ${STEP_SECS[i]} s"
        prev=$step
    done
    scale_report "$(calc 'printf "%.1f", (b - a) / 60' "a=$started" "b=$(scale_now)")"
}

# scale_report MINUTES: the table on stdout.
scale_report() {
    local i last=$((${#SCALE_STEPS[@]} - 1)) key verdict errs cells p50s e name
    local pass=0 total=0 commit
    commit=$(git -C "$CRM_REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [[ -z $(git -C "$CRM_REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] || commit="$commit+changes"
    # row LABEL TARGET VALUES...: one table row, the growth from the first value to the last.
    row() {
        local label=$1 target=$2
        shift 2
        local -a v=("$@")
        printf '| %s |' "$label"
        printf ' %s |' "${v[@]}"
        printf ' %s | %s |\n' "$(growth "${v[0]}" "${v[-1]}")" "$target"
    }
    # tally VERDICT: count a target.
    tally() {
        total=$((total + 1))
        if [[ $1 == PASS ]]; then pass=$((pass + 1)); fi
    }

    printf '\nScale benchmark %s on %s cores (%s), commit %s, %s min in all\n\n' \
        "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$(uname -m)" "$commit" "$1"
    printf '    %s\n\n' "$SCALE_COMMAND"
    printf '| figure |'
    for ((i = 0; i <= last; i++)); do printf ' %s contacts |' "${SCALE_STEPS[$i]}"; done
    printf ' growth (%s) | target |\n|---|' "$(growth "${SCALE_STEPS[0]}" "${SCALE_STEPS[$last]}")"
    for ((i = 0; i <= last; i++)); do printf -- '---|'; done
    printf -- '---|---|\n'

    errs=0
    for ((i = 0; i <= last; i++)); do errs=$((errs + W_ERR[i])); done
    verdict=$(within "${W_RATE[0]}" "${W_RATE[$last]}" ">=" 0.9)
    ((errs == 0)) || verdict="FAIL ($errs errors)"
    tally "$verdict"
    row "POST /v1/contacts, $SCALE_CONNECTIONS connections: contacts/s over the step" \
        "≥ ×0.9: $verdict" "${W_RATE[@]}"
    row "POST /v1/contacts: p50 ms" "" "${W_P50[@]}"
    for key in "${READ_KEYS[@]}"; do
        cells=() p50s=() errs=0
        for ((i = 0; i <= last; i++)); do
            e=${R_ERR[$key:$i]:-0}
            errs=$((errs + e))
            p50s+=("${R_P50[$key:$i]}")
            if [[ ${R_P50[$key:$i]} == na ]]; then
                cells+=("error: $e × $(scale_error "${R_ERRST[$key:$i]}")")
            elif ((e > 0)); then
                cells+=("${R_P50[$key:$i]} / ${R_P95[$key:$i]} ($e errors, first $(scale_error "${R_ERRST[$key:$i]}"))")
            else
                cells+=("${R_P50[$key:$i]} / ${R_P95[$key:$i]}")
            fi
        done
        verdict=$(within "${p50s[0]}" "${p50s[$last]}" "<=" 1.5)
        ((errs == 0)) || verdict="FAIL ($errs errors)"
        tally "$verdict"
        printf '| %s: p50 / p95 ms |' "${READ_LABEL[$key]}"
        printf ' %s |' "${cells[@]}"
        printf ' %s | p50 ≤ ×1.5: %s |\n' "$(growth "${p50s[0]}" "${p50s[$last]}")" "$verdict"
    done
    row "\`crm serve\` RSS, MiB (after the reads)" "" "${SERVE_RSS[@]}"
    row "events in the store" "" "${EVENTS[@]}"
    row "bytes per event on disk (events table with its indexes and TOAST)" "" "${BPE[@]}"
    for name in contacts activity; do
        local -a secs=() rates=() rss=()
        for ((i = 0; i <= last; i++)); do
            secs+=("${RB_SECS[$name:$i]}") rates+=("${RB_RATE[$name:$i]}") rss+=("${RB_RSS[$name:$i]}")
        done
        row "\`crm rebuild $name\`: wall time, s" "" "${secs[@]}"
        row "\`crm rebuild $name\`: events/s" "" "${rates[@]}"
        verdict=$(within "${rss[0]}" "${rss[$last]}" "<=" 1.3)
        tally "$verdict"
        row "\`crm rebuild $name\`: peak RSS, MiB (${RB_SRC[$name]:-?})" "≤ ×1.3: $verdict" "${rss[@]}"
    done
    printf '\nTargets: %s of %s PASS.' "$pass" "$total"
    ((SEED_ERRORS == 0)) || printf ' The seed (long contacts, second user) had %s failed requests.' "$SEED_ERRORS"
    printf '\n\nEntries on the page of each read (first step → last; at most 50):'
    for key in "${READ_KEYS[@]}"; do
        printf ' %s %s→%s;' "$key" "${R_ITEMS[$key:0]}" "${R_ITEMS[$key:$last]}"
    done
    printf '\n\nStep durations (growth, drain, reads, rebuilds):'
    for ((i = 0; i <= last; i++)); do printf ' %s s' "${STEP_SECS[$i]}"; done
    printf '.\n'
}

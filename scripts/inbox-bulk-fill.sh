#!/usr/bin/env bash
# Fills a Herald SQLite inbox with USERS inboxes x ITEMS items straight in SQL, for the list/count benchmark
# at a scale that `inbox_notify` would take hours to reach (docs/BENCHMARKS.md, "Notification inbox", 3).
# Setup, not a measured path. Called by `FILL=bulk scripts/bench-inbox.sh`; usable alone:
#
#   scripts/inbox-bulk-fill.sh DATA_DIR USERS ITEMS
#
# DATA_DIR/inbox.sqlite3 must be an inbox Herald created (start Herald once with inbox.enabled=true on an empty
# data dir, stop it) and must be empty; Herald must not be running on it. The rows come from
# scripts/inbox-bulk-fill.sql (the one place the benchmark knows the items table; its COLUMNS line is
# checked against the file first); the counts are left empty for Herald's start-up recount to rebuild.
# Herald's indexes stay in place: the rows go in id order, so three of them only ever append and the two
# that start with the user append at one place per user (100 000 leaf pages, in a 2 GB page cache), and
# nothing has to be rebuilt after the load. Prints one JSON line with the timings and sizes. Needs the
# sqlite3 shell (3.33 or later).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$1 USERS=$2 ITEMS=$3
DB=$DIR/inbox.sqlite3
[ -f "$DB" ] || { echo "no $DB: start Herald once on $DIR with the inbox enabled" >&2; exit 2; }
command -v sqlite3 >/dev/null || { echo "needs the sqlite3 shell (apt-get install sqlite3)" >&2; exit 2; }
# The columns the SQL writes, in order, from its own header line.
WANT=$(sed -n 's/^-- COLUMNS //p' scripts/inbox-bulk-fill.sql)
HAVE=$(sqlite3 "$DB" "SELECT group_concat(name, ',') FROM pragma_table_info('items')")
if [ "$HAVE" != "$WANT" ]; then
  echo "the items table differs from what scripts/inbox-bulk-fill.sql writes:" >&2
  echo "  file:     $HAVE" >&2
  echo "  expected: $WANT" >&2
  exit 2
fi
[ "$(sqlite3 "$DB" 'SELECT count(*) FROM items')" = 0 ] || { echo "$DB already has items" >&2; exit 2; }

# Free space (GB) under which no further chunk starts (a chunk of 100 000 users x 20 items is ~0.8 GB).
# FILL_SECS: no copy chunk starts after this many seconds (the newest items are still written after it, so
# every inbox ends with the same shape, only shorter). FILL_NEW: how many newest levels are generated with
# the states of new items (default 20; 0 leaves every item with an old item's states, to save time).
MIN_FREE_GB=${MIN_FREE_GB:-14}
FILL_SECS=${FILL_SECS:-86400}
NEW=${FILL_NEW:-20}   # the newest item levels, generated: the ones still mostly unread
BASE=20               # item levels generated first, then copied forward BASE levels at a time
[ "$ITEMS" -ge $((NEW + BASE)) ] || { NEW=$ITEMS; BASE=0; }
NOW=$(date +%s)000
free_gb() { df -P --block-size=1G "$DIR" | awk 'NR == 2 { print $4 }'; }
# The template: the first BASE levels, generated once into a file of their own and copied forward from
# there (see the .sql); deleted at the end.
TPL=$DIR/fill-template.sqlite3
chunk() { # database mode from to items
  local attach="ATTACH '$TPL' AS tpl"
  # Generating the template itself: an empty stand-in (a file attached to itself would be locked by itself).
  [ "$1" != "$TPL" ] || attach="ATTACH ':memory:' AS tpl; CREATE TABLE tpl.items AS SELECT * FROM main.items WHERE 0"
  sqlite3 "$1" -cmd "$attach" -cmd ".parameter set @users $USERS" -cmd ".parameter set @items $5" \
    -cmd ".parameter set @from $3" -cmd ".parameter set @to $4" -cmd ".parameter set @now $NOW" \
    -cmd ".parameter set @mode '$2'" <scripts/inbox-bulk-fill.sql >/dev/null
  echo "fill: $2 levels $3..$4 into $(basename "$1") done after $(( $(date +%s) - ${t0%.*} )) s, $(free_gb) GB free ($(uptime | sed 's/.*load average/load average/'))" >&2
}

t0=$(date +%s.%N)
sqlite3 "$DB" "PRAGMA journal_mode = DELETE" >/dev/null   # off WAL: the load needs no WAL
# In chunks of item levels (USERS rows each, one statement per chunk): a stop for lack of disk or time
# leaves a consistent file of every inbox with the same number of items.
rm -f "$TPL"
sqlite3 "$TPL" "$(sqlite3 "$DB" "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'items'")"
DONE=0
if [ "$BASE" != 0 ]; then
  chunk "$TPL" generate 0 "$BASE" "$ITEMS"
  chunk "$DB" copy 0 "$BASE" "$ITEMS"
  DONE=$BASE
fi
while [ "$DONE" -lt $((ITEMS - NEW)) ]; do
  if [ "$(free_gb)" -lt "$MIN_FREE_GB" ]; then
    echo "fill: stopping at $DONE levels: $(free_gb) GB free, under $MIN_FREE_GB" >&2; break
  fi
  if [ $(( $(date +%s) - ${t0%.*} )) -ge "$FILL_SECS" ]; then
    echo "fill: stopping at $DONE levels: FILL_SECS=$FILL_SECS reached" >&2; break
  fi
  TO=$((DONE + BASE > ITEMS - NEW ? ITEMS - NEW : DONE + BASE))
  chunk "$DB" copy "$DONE" "$TO" "$ITEMS"
  DONE=$TO
done
if [ "$NEW" -gt 0 ]; then
  chunk "$DB" generate "$DONE" $((DONE + NEW)) $((DONE + NEW))
  DONE=$((DONE + NEW))
fi
# One row per inbox (version as if every item had made one event), and the id sequence past the rows.
sqlite3 "$DB" -cmd ".parameter set @users $USERS" -cmd ".parameter set @items $DONE" "
  INSERT INTO inboxes (user, version)
    WITH RECURSIVE n(u) AS (SELECT 0 UNION ALL SELECT u + 1 FROM n WHERE u + 1 < @users)
    SELECT 'u' || u, @items FROM n;
  DELETE FROM sqlite_sequence WHERE name = 'items';
  INSERT INTO sqlite_sequence (name, seq) SELECT 'items', max(id) FROM items;"
sqlite3 "$DB" "PRAGMA journal_mode = WAL" >/dev/null
rm -f "$TPL"
t1=$(date +%s.%N)
ROWS=$(sqlite3 "$DB" 'SELECT max(id) FROM items')
echo "{\"users\": $USERS, \"items_planned\": $ITEMS, \"items\": $DONE, \"fill_secs\": $FILL_SECS, \"rows\": $ROWS, \"insert_secs\": $(echo "$t1 - $t0" | bc), \"db_bytes\": $(stat -c %s "$DB")}"

/* Runs each query to the end with the SQLite that rusqlite bundles, ?1 bound to now (ms), and prints the
   rows it returned and the wall time: the sweep's and the recount's cost at scale, outside Herald
   (docs/BENCHMARKS.md, "Notification inbox", 3). Build as plan.c; wrap in /usr/bin/time for CPU.
   Usage: timeq DB "SELECT ..." ... */
#include <stdio.h>
#include <time.h>
#include "sqlite3.h"
static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  sqlite3 *db;
  if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READONLY, 0)) return 1;
  struct timespec rt; clock_gettime(CLOCK_REALTIME, &rt);
  long long now_ms = rt.tv_sec * 1000LL + rt.tv_nsec / 1000000;
  for (int i = 2; i < argc; i++) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, argv[i], -1, &st, 0)) { printf("error: %s\n", sqlite3_errmsg(db)); continue; }
    if (sqlite3_bind_parameter_count(st) >= 1) sqlite3_bind_int64(st, 1, now_ms);
    double t0 = now_s(); long rows = 0; int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) rows++;
    printf("%.3f s, %ld rows%s: %s\n", now_s() - t0, rows, rc == SQLITE_DONE ? "" : " (error)", argv[i]);
    sqlite3_finalize(st);
  }
  return 0;
}

/* Prints EXPLAIN QUERY PLAN of each query with the SQLite that rusqlite bundles (docs/BENCHMARKS.md,
   "Notification inbox", 3: the sweep and the recount). Build against the bundled amalgamation:
   cp CARGO_HOME/registry/src/INDEX/libsqlite3-sys-0.35.0/sqlite3/sqlite3.[ch] . && gcc -O2 -o plan plan.c sqlite3.c -lm
   Usage: plan DB "SELECT ..." ... */
#include <stdio.h>
#include "sqlite3.h"
static int cb(void *u, int n, char **v, char **c) { (void)u; (void)c; printf("   %s\n", v[n-1]); return 0; }
int main(int argc, char **argv) {
  sqlite3 *db; char *err = 0;
  if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READONLY, 0)) return 1;
  printf("sqlite %s\n", sqlite3_libversion());
  for (int i = 2; i < argc; i++) {
    char q[4096]; snprintf(q, sizeof q, "EXPLAIN QUERY PLAN %s", argv[i]);
    printf("%s\n", argv[i]);
    if (sqlite3_exec(db, q, cb, 0, &err)) { printf("error: %s\n", err); }
  }
  return 0;
}

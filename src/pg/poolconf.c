/*
 * poolconf.c: per-pool settings (ALTER ROLE / DATABASE ... SET nextgres.x).
 *
 * - A change notice from the backend that commits ALTER ROLE / DATABASE ...
 *   SET | RESET (or renames or drops a role or database, which changes what
 *   applies to which pool) to the pooler, which then has pg_db_role_setting
 *   read again by a short-lived worker (src/pooler/poolconf.rs).  The pooler
 *   cannot read that catalog itself: it belongs to no database, and
 *   pg_db_role_setting is not one of the nailed shared relations, so opening
 *   it needs pg_class ("cannot read pg_class without having selected a
 *   database", a FATAL in relcache.c).
 * - The database that reader connects to (any will do: the catalog is shared).
 * - Check hooks for the pool settings: they are PGC_SUSET so ALTER ROLE /
 *   DATABASE ... SET accepts them (validate_option_array_item() in guc.c tests
 *   them with PGC_S_TEST), but a session's SET (PGC_S_SESSION) or a startup
 *   option (PGC_S_CLIENT) would change nothing the pooler reads, so those are
 *   refused with 55P02, as the server refuses a PGC_SIGHUP setting in a SET.
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/guc.h"
#include "utils/rel.h"

#include "glue.h"

/*
 * Rust (src/pooler/poolconf.rs).  Called from the commit callback, which
 * runs after ProcArrayEndTransaction() (CommitTransaction() in xact.c), so
 * the reader's later snapshot sees the change.
 */
extern void nextgres_pool_conf_changed(void);

static ProcessUtility_hook_type prev_utility = NULL;
static bool conf_touched = false;

static void
ng_poolconf_xact(XactEvent event, void *arg)
{
	if (!conf_touched)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
	{
		conf_touched = false;
		nextgres_pool_conf_changed();
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
			 event == XACT_EVENT_PREPARE)
		conf_touched = false;	/* prepared: its COMMIT PREPARED notifies */
}

static bool
touches_pool_conf(Node *stmt)
{
	switch (nodeTag(stmt))
	{
		case T_AlterRoleSetStmt:
		case T_AlterDatabaseSetStmt:
		case T_DropRoleStmt:
		case T_DropdbStmt:
			return true;
		case T_TransactionStmt:
			/* It may commit a prepared ALTER ROLE / DATABASE ... SET. */
			return ((TransactionStmt *) stmt)->kind == TRANS_STMT_COMMIT_PREPARED;
		case T_RenameStmt:
			{
				ObjectType	t = ((RenameStmt *) stmt)->renameType;

				return t == OBJECT_ROLE || t == OBJECT_DATABASE;
			}
		default:
			return false;
	}
}

static void
ng_poolconf_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					ProcessUtilityContext context, ParamListInfo params,
					QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (touches_pool_conf(pstmt->utilityStmt))
		conf_touched = true;
	if (prev_utility)
		prev_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* Postmaster: every backend inherits the hook and the callback. */
void
ng_install_poolconf_hooks(void)
{
	prev_utility = ProcessUtility_hook;
	ProcessUtility_hook = ng_poolconf_utility;
	RegisterXactCallback(ng_poolconf_xact, NULL);
}

/*
 * Pooler: a database the pg_db_role_setting reader can connect to: "postgres"
 * if it accepts connections, else the first that does and is no template,
 * else the first that does.  InvalidOid if none or on error.  A heap scan of
 * pg_database (a nailed shared relation), as ng_login_lookup() in glue.c.
 */
Oid
ng_pick_reader_database(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile Oid result = InvalidOid;

	PG_TRY();
	{
		Relation	rel;
		TableScanDesc scan;
		HeapTuple	tup;
		Oid			plain = InvalidOid,
					any = InvalidOid,
					postgres = InvalidOid;

		StartTransactionCommand();
		rel = table_open(DatabaseRelationId, AccessShareLock);
		scan = table_beginscan_catalog(rel, 0, NULL);
		while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
		{
			Form_pg_database d = (Form_pg_database) GETSTRUCT(tup);

			if (!d->datallowconn)
				continue;
			if (strcmp(NameStr(d->datname), "postgres") == 0)
				postgres = d->oid;
			if (!OidIsValid(plain) && !d->datistemplate)
				plain = d->oid;
			if (!OidIsValid(any))
				any = d->oid;
		}
		table_endscan(scan);
		table_close(rel, AccessShareLock);
		CommitTransactionCommand();
		result = OidIsValid(postgres) ? postgres : OidIsValid(plain) ? plain : any;
	}
	PG_CATCH();
	{
		NgError		err;

		ng_capture_error(cxt, &err);
		AbortCurrentTransaction();
		result = InvalidOid;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return result;
}

static bool
pooler_only(const char *name, GucSource source)
{
	if (source != PGC_S_SESSION && source != PGC_S_CLIENT)
		return true;
	GUC_check_errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM);
	GUC_check_errmsg("parameter \"%s\" cannot be set in a session", name);
	GUC_check_errdetail("It applies to the pooler's pools, which read it from postgresql.conf and pg_db_role_setting.");
	GUC_check_errhint("Use ALTER ROLE ... SET, ALTER DATABASE ... SET or ALTER ROLE ... IN DATABASE ... SET, or postgresql.conf and pg_reload_conf().");
	return false;
}

#define NG_POOL_CHECK_INT(fn, guc) \
	bool fn(int *newval, void **extra, GucSource source) { return pooler_only(guc, source); }

NG_POOL_CHECK_INT(ng_check_pool_size, "nextgres.pool_size")
NG_POOL_CHECK_INT(ng_check_pool_mode, "nextgres.pool_mode")
NG_POOL_CHECK_INT(ng_check_query_wait_timeout, "nextgres.query_wait_timeout")
NG_POOL_CHECK_INT(ng_check_idle_backend_timeout, "nextgres.idle_backend_timeout")
NG_POOL_CHECK_INT(ng_check_min_pool_size, "nextgres.min_pool_size")
NG_POOL_CHECK_INT(ng_check_pool_priority, "nextgres.pool_priority")
NG_POOL_CHECK_INT(ng_check_reserve_pool_size, "nextgres.reserve_pool_size")
NG_POOL_CHECK_INT(ng_check_reserve_pool_timeout, "nextgres.reserve_pool_timeout")
NG_POOL_CHECK_INT(ng_check_max_db_connections, "nextgres.max_db_connections")
NG_POOL_CHECK_INT(ng_check_max_user_connections, "nextgres.max_user_connections")
NG_POOL_CHECK_INT(ng_check_backend_lifetime, "nextgres.backend_lifetime")
NG_POOL_CHECK_INT(ng_check_max_pinned_backends, "nextgres.max_pinned_backends")

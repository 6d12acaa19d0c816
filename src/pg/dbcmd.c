/*
 * dbcmd.c: commands that need a database to themselves.
 *
 * DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE and CREATE
 * DATABASE (from its TEMPLATE, template1 by default) fail while another
 * backend is connected to that database, and a pool's parked backends are
 * connected. Before such a
 * command runs, this hook (in whichever backend runs it) asks the pooler to
 * close that database's pooled backends and to keep new ones out until the
 * command ends; the server's own wait for other backends to leave (up to
 * 5 s, in CountOtherDBBackends) then sees them go. Backends serving a
 * client mid-transaction or a pinned session still count, as direct
 * sessions do.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/syscache.h"

/* Rust (src/backend/drain.rs); -1 when the pooler cannot be told. */
extern int	nextgres_drain_begin(const char *database);
extern void nextgres_drain_end(int slot);

static ProcessUtility_hook_type prev_utility = NULL;

static bool
has_option(List *options, const char *name, DefElem **found)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *d = (DefElem *) lfirst(lc);

		if (strcmp(d->defname, name) == 0)
		{
			*found = d;
			return true;
		}
	}
	return false;
}

/* The database the statement needs alone, or NULL. */
static const char *
database_needed_alone(Node *n)
{
	DefElem    *d;

	switch (nodeTag(n))
	{
		case T_DropdbStmt:
			return ((DropdbStmt *) n)->dbname;
		case T_RenameStmt:
			if (((RenameStmt *) n)->renameType == OBJECT_DATABASE)
				return ((RenameStmt *) n)->subname;
			return NULL;
		case T_AlterDatabaseStmt:
			if (has_option(((AlterDatabaseStmt *) n)->options, "tablespace", &d))
				return ((AlterDatabaseStmt *) n)->dbname;
			return NULL;
		case T_CreatedbStmt:
			/* Without TEMPLATE (or TEMPLATE DEFAULT) it copies template1. */
			if (!has_option(((CreatedbStmt *) n)->options, "template", &d) || d->arg == NULL)
				return "template1";
			if (IsA(d->arg, String))
				return strVal(d->arg);
			return NULL;
		default:
			return NULL;
	}
}

/* Does the current user own database `dboid` (acl.h; renamed in 16)? */
static bool
owns_database(Oid dboid)
{
#if PG_VERSION_NUM >= 160000
	return object_ownercheck(DatabaseRelationId, dboid, GetUserId());
#else
	return pg_database_ownercheck(dboid, GetUserId());
#endif
}

/* CREATEDB (dbcommands.c have_createdb_privilege(), not exported before 17). */
static bool
may_create_db(void)
{
	HeapTuple	tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(GetUserId()));
	bool		yes = false;

	if (HeapTupleIsValid(tup))
	{
		yes = ((Form_pg_authid) GETSTRUCT(tup))->rolcreatedb;
		ReleaseSysCache(tup);
	}
	return yes;
}

/*
 * Would the server let the current user run `n` on `db`?  It checks only
 * after this hook, so a command that is then refused (not the owner, no
 * CREATEDB) must not drain anyone's pool first: any user could otherwise
 * flush another database's pool with a failing DROP DATABASE.  Mirrors
 * dropdb(), RenameDatabase(), movedb() (owner) and createdb() (CREATEDB,
 * and a template that is one or is the user's own).
 */
static bool
may_act_on(Node *n, const char *db)
{
	Oid			dboid = get_database_oid(db, true);
	HeapTuple	tup;
	bool		istemplate = false;

	if (!OidIsValid(dboid))
		return false;
	if (superuser())
		return true;
	if (!IsA(n, CreatedbStmt))
		return owns_database(dboid);
	if (!may_create_db())
		return false;
	tup = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(dboid));
	if (HeapTupleIsValid(tup))
	{
		istemplate = ((Form_pg_database) GETSTRUCT(tup))->datistemplate;
		ReleaseSysCache(tup);
	}
	return istemplate || owns_database(dboid);
}

static void
ng_dbcmd_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				 ProcessUtilityContext context, ParamListInfo params,
				 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	const char *db = database_needed_alone(pstmt->utilityStmt);
	int			slot = db && may_act_on(pstmt->utilityStmt, db) ? nextgres_drain_begin(db) : -1;

	PG_TRY();
	{
		if (prev_utility)
			prev_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		if (slot >= 0)
			nextgres_drain_end(slot);
	}
	PG_END_TRY();
}

/* Postmaster: every backend inherits the hook. */
void
ng_install_dbcmd_hook(void)
{
	prev_utility = ProcessUtility_hook;
	ProcessUtility_hook = ng_dbcmd_utility;
}

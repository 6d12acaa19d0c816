/*
 * dbcmd.c: commands that need a database to themselves.
 *
 * DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE and CREATE
 * DATABASE ... TEMPLATE fail while another backend is connected to that
 * database, and a pool's parked backends are connected. Before such a
 * command runs, this hook (in whichever backend runs it) asks the pooler to
 * close that database's pooled backends and to keep new ones out until the
 * command ends; the server's own wait for other backends to leave (up to
 * 5 s, in CountOtherDBBackends) then sees them go. Backends serving a
 * client mid-transaction or a pinned session still count, as direct
 * sessions do.
 */
#include "postgres.h"

#include "nodes/parsenodes.h"
#include "tcop/utility.h"

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
			if (has_option(((CreatedbStmt *) n)->options, "template", &d) &&
				d->arg != NULL && IsA(d->arg, String))
				return strVal(d->arg);
			return NULL;
		default:
			return NULL;
	}
}

static void
ng_dbcmd_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				 ProcessUtilityContext context, ParamListInfo params,
				 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	const char *db = database_needed_alone(pstmt->utilityStmt);
	int			slot = db ? nextgres_drain_begin(db) : -1;

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

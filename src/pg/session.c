/*
 * session.c: what a pooled backend knows about its client's session, so the
 * session can follow the client to another backend (settings, prepared
 * statements) or must keep the client here (state that cannot move).
 *
 * Same rules as glue.c: compiled against the target server's headers, thin,
 * and no ereport(ERROR) escapes into Rust (PG_TRY everywhere it can throw).
 */
#define _GNU_SOURCE				/* dl_iterate_phdr */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_class.h"
#include "catalog/pg_db_role_setting.h"
#include "catalog/pg_depend.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "common/pg_prng.h"
#include "commands/discard.h"
#include "commands/prepare.h"
#include "executor/executor.h"
#include "executor/execdesc.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/ilist.h"
#include "lib/stringinfo.h"
#include "libpq/libpq.h"
#include "libpq/libpq-be.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "parser/analyze.h"
#include "parser/parse_node.h"
#include "parser/parse_param.h"
#include "parser/parser.h"
#include "parser/scansup.h"
#include "port/pg_bswap.h"
#include "postmaster/interrupt.h"
#include "postmaster/postmaster.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#if PG_VERSION_NUM >= 180000
#include "tcop/backend_startup.h"
#endif
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/pgstat_internal.h"
#include "utils/plancache.h"
#include "utils/portal.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/tuplestore.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "glue.h"

/* ------------------------------------------------------------------------
 * Version differences.
 * ------------------------------------------------------------------------ */

static struct config_generic **
guc_array(int *n)
{
#if PG_VERSION_NUM >= 160000
	return get_guc_variables(n);	/* palloc'd, sorted */
#else
	*n = GetNumConfigOptions();
	return get_guc_variables();
#endif
}

static pg_noinline struct config_generic *lookup_guc(const char *name);

static bool
holds_session_locks(void)
{
	/* Outside a transaction a backend holds only session-level locks. */
	for (int i = 0; i < NUM_LOCK_PARTITIONS; i++)
	{
#if PG_VERSION_NUM >= 160000
		if (!dlist_is_empty(&MyProc->myProcLocks[i]))
			return true;
#else
		if (!SHMQueueEmpty(&MyProc->myProcLocks[i]))
			return true;
#endif
	}
	return false;
}

/* pg_stat_database's session count in a backend's pending statistics. */
#if PG_VERSION_NUM >= 160000
#define DB_SESSIONS(e) ((e)->sessions)
#else
#define DB_SESSIONS(e) ((e)->n_sessions)
#endif

/* After writing a tuple descriptor's attribute directly. */
static void
attr_written(TupleDesc d, int i)
{
#if PG_VERSION_NUM >= 180000
	populate_compact_attribute(d, i);
#else
	(void) d;
	(void) i;
#endif
}

/* ------------------------------------------------------------------------
 * Tracking what the client did, so a release only looks when needed.
 * ------------------------------------------------------------------------ */

static ProcessUtility_hook_type prev_utility = NULL;
static post_parse_analyze_hook_type prev_post_parse_analyze = NULL;
static object_access_hook_type prev_object_access = NULL;
static needs_fmgr_hook_type prev_needs_fmgr = NULL;
static fmgr_hook_type prev_fmgr = NULL;

static bool settings_dirty = false;
static bool statements_dirty = false;
/* A statement ran since the last boundary (executor or utility hook). */
static bool statement_ran = false;
/* The client has statements this backend has not created yet (see below). */
static bool statements_pending = false;
/*
 * This backend is a pool login (backend/login.rs).  The set_config trackers
 * below run only there: another backend (a direct client's) plans and runs
 * exactly as on a server without nextgres.
 */
static bool pooled_backend = false;

void		ng_set_pooled_backend(bool on);

/*
 * A cancel may be due at the client's first statement after its attach
 * (backend/cancel.rs): one that came while the backend switched to the
 * client or read its query is dropped by the server (postgres.c drops a
 * cancel that lands while it reads a command), so the statement that
 * starts first takes it.  Not while nextgres itself creates a statement
 * the client named (ng_create_statement catches errors).
 */
static bool cancel_armed = false;
static int	creating_statement = 0;

/* Parse analysis under a statement's own settings (see analysis_gucs). */
static int	analysis_nest = 0;
static void analysis_done(void);
static struct NgAnalysis *analysis_of(CachedPlanSource *src);

extern bool ng_rs_cancel_due(void);
void		ng_set_cancel_armed(bool on);

void
ng_set_cancel_armed(bool on)
{
	cancel_armed = on;
}

static inline void
cancel_check(void)
{
	if (cancel_armed && creating_statement == 0)
	{
		cancel_armed = false;
		if (ng_rs_cancel_due())
		{
			/* As StatementCancelHandler (postgres.c), now that no command is read. */
			QueryCancelPending = true;
			InterruptPending = true;
			CHECK_FOR_INTERRUPTS();
		}
	}
}

void
ng_set_pooled_backend(bool on)
{
	pooled_backend = on;
}

/*
 * Whether `text` contains `needle` (ASCII, lower case, with an underscore),
 * ignoring case.  Only where the text has an underscore can the word start
 * (strchr() finds them fast); strcasestr()'s two-way setup per call cost
 * more than the search for a statement's text (0.5% of a pooled backend's
 * CPU; perf, issue 15).
 */
static bool
mentions(const char *text, const char *needle)
{
	size_t		n = strlen(needle);
	size_t		k = strchr(needle, '_') - needle;

	for (const char *u = strchr(text, '_'); u != NULL; u = strchr(u + 1, '_'))
	{
		if ((size_t) (u - text) >= k && pg_strncasecmp(u - k, needle, n) == 0)
			return true;
	}
	return false;
}

/* Implemented in backend/session.rs: create the client's statement `name`
 * here now if it is one not created yet; all of them; forget them all. */
extern void ng_rs_statement_wanted(const char *name);
extern void ng_rs_statements_wanted_all(void);
extern void ng_rs_statements_forget(void);

static void
want_statement(const char *name)
{
	/* The server's table keys names by their first NAMEDATALEN-1 bytes. */
	char		key[NAMEDATALEN];

	if (statements_pending && name && name[0])
	{
		strlcpy(key, name, sizeof(key));
		ng_rs_statement_wanted(key);
	}
}

/* EXPLAIN EXECUTE / CREATE TABLE AS EXECUTE: the analyzed inner query. */
static void
want_executed(Node *query)
{
	if (query && IsA(query, Query) && ((Query *) query)->commandType == CMD_UTILITY &&
		((Query *) query)->utilityStmt && IsA(((Query *) query)->utilityStmt, ExecuteStmt))
		want_statement(((ExecuteStmt *) ((Query *) query)->utilityStmt)->name);
}
/*
 * EXECUTE s, EXPLAIN EXECUTE s, CREATE TABLE AS EXECUTE s at parse analysis:
 * the extended protocol describes such a statement (Describe of its portal,
 * utility.c UtilityTupleDescriptor) before the utility hook runs, looking s
 * up without an error if it is missing, so s must exist by then or the
 * client is told NoData and then sent rows.
 */
static void
ng_post_parse_analyze(ParseState *pstate, Query *query, JumbleState *jstate)
{
	cancel_check();
	if (prev_post_parse_analyze)
		prev_post_parse_analyze(pstate, query, jstate);
	analysis_done();
	if (statements_pending && query->commandType == CMD_UTILITY && query->utilityStmt)
	{
		Node	   *n = query->utilityStmt;

		/* EXPLAIN and CREATE TABLE AS hold their inner statement analyzed. */
		if (IsA(n, ExplainStmt))
			n = ((ExplainStmt *) n)->query;
		else if (IsA(n, CreateTableAsStmt))
			n = ((CreateTableAsStmt *) n)->query;
		if (n && IsA(n, Query) && ((Query *) n)->commandType == CMD_UTILITY)
			n = ((Query *) n)->utilityStmt;
		if (n && IsA(n, ExecuteStmt))
			want_statement(((ExecuteStmt *) n)->name);
	}
}

static List *holdable_cursors = NIL;	/* names, TopMemoryContext */
static List *listen_channels = NIL;	/* names, TopMemoryContext */
/*
 * UNLISTENs (a name, or NULL for all) run in the current transaction: as in
 * async.c they take effect only when it commits (ng_xact_callback), so one
 * rolled back leaves the channel listened to, and the client pinned.
 */
static List *unlisten_pending = NIL;	/* names, TopMemoryContext */
static bool unlisten_all_pending = false;

static void
unlisten_pending_clear(void)
{
	list_free_deep(unlisten_pending);
	unlisten_pending = NIL;
	unlisten_all_pending = false;
}

static void
unlisten_apply(void)
{
	ListCell   *lc;

	if (unlisten_all_pending)
	{
		list_free_deep(listen_channels);
		listen_channels = NIL;
	}
	foreach(lc, unlisten_pending)
	{
		ListCell   *lc2;

		foreach(lc2, listen_channels)
		{
			if (strcmp((char *) lfirst(lc2), (char *) lfirst(lc)) == 0)
				listen_channels = foreach_delete_current(listen_channels, lc2);
		}
	}
	unlisten_pending_clear();
}
typedef enum
{
	TEMP_NONE, TEMP_PRESENT, TEMP_OBJECT_PRESENT, TEMP_MAYBE_GONE
} TempState;
static TempState temp_state = TEMP_NONE;

static void
note_discard(DiscardMode mode)
{
	if (mode == DISCARD_ALL || mode == DISCARD_PLANS)
		statements_dirty = true;
	/* Its UNLISTEN * is noted once the statement succeeded (ng_utility). */
	if (mode == DISCARD_ALL)
		settings_dirty = true;
	if ((mode == DISCARD_ALL || mode == DISCARD_TEMP) &&
		(temp_state == TEMP_PRESENT || temp_state == TEMP_OBJECT_PRESENT))
		temp_state = TEMP_MAYBE_GONE;
}

static void
ng_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
		   ProcessUtilityContext context, ParamListInfo params,
		   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *n = pstmt->utilityStmt;

	cancel_check();
	/*
	 * DEALLOCATE, CLOSE and PREPARE run nothing that reads sequence values:
	 * they do not use up a client's sequence pin (sequence_pin()), as PHP
	 * PDO's DEALLOCATE of a statement object destroyed between an INSERT and
	 * its lastInsertId() would (55000 "lastval is not yet defined").
	 */
	if (!IsA(n, DeallocateStmt) && !IsA(n, ClosePortalStmt) && !IsA(n, PrepareStmt))
		statement_ran = true;
	switch (nodeTag(n))
	{
		case T_VariableSetStmt:
		case T_DoStmt:
		case T_CallStmt:
			settings_dirty = true;
			break;
		case T_PrepareStmt:
			statements_dirty = true;
			/* An existing name must fail with 42P05 as it would directly. */
			want_statement(((PrepareStmt *) n)->name);
			break;
		case T_DeallocateStmt:
			statements_dirty = true;
			if (((DeallocateStmt *) n)->name)
				want_statement(((DeallocateStmt *) n)->name);
			else if (statements_pending)
				ng_rs_statements_forget();
			break;
		case T_ExecuteStmt:
			want_statement(((ExecuteStmt *) n)->name);
			break;
		case T_ExplainStmt:
			want_executed(((ExplainStmt *) n)->query);
			break;
		case T_CreateTableAsStmt:
			want_executed(((CreateTableAsStmt *) n)->query);
			break;
		case T_DiscardStmt:
			note_discard(((DiscardStmt *) n)->target);
			break;
		case T_ListenStmt:
			{
				MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

				listen_channels = lappend(listen_channels,
										  pstrdup(((ListenStmt *) n)->conditionname));
				MemoryContextSwitchTo(old);
			}
			break;
		case T_UnlistenStmt:
			/* Noted below once it succeeded; applied at commit. */
			break;
		case T_DeclareCursorStmt:
			if (((DeclareCursorStmt *) n)->options & CURSOR_OPT_HOLD)
			{
				MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

				holdable_cursors = lappend(holdable_cursors,
										   pstrdup(((DeclareCursorStmt *) n)->portalname));
				MemoryContextSwitchTo(old);
			}
			break;
		default:
			break;
	}
	if (prev_utility)
		prev_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	/*
	 * A PREPARE analyzed its statement under the settings in force now: noted
	 * at once, before a later SET in the same transaction changes them.
	 */
	if (IsA(n, PrepareStmt) && pooled_backend)
	{
		PreparedStatement *ps = FetchPreparedStatement(((PrepareStmt *) n)->name, false);

		if (ps)
			(void) analysis_of(ps->plansource);
	}
	/* Only once it succeeded (it refuses to run in a transaction block). */
	if (IsA(n, DiscardStmt) && ((DiscardStmt *) n)->target == DISCARD_ALL && statements_pending)
		ng_rs_statements_forget();
	/*
	 * UNLISTEN (and DISCARD ALL's UNLISTEN *) once it succeeded: it stops
	 * the channel when the transaction commits, as async.c does.
	 */
	if (IsA(n, UnlistenStmt) || (IsA(n, DiscardStmt) && ((DiscardStmt *) n)->target == DISCARD_ALL))
	{
		const char *ch = IsA(n, UnlistenStmt) ? ((UnlistenStmt *) n)->conditionname : NULL;

		if (ch == NULL)
			unlisten_all_pending = true;
		else
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			unlisten_pending = lappend(unlisten_pending, pstrdup(ch));
			MemoryContextSwitchTo(old);
		}
	}
}

static void
ng_object_access(ObjectAccessType access, Oid classId, Oid objectId, int subId, void *arg)
{
	if (prev_object_access)
		prev_object_access(access, classId, objectId, subId, arg);
	/*
	 * The executor asks before it runs any function of an expression,
	 * built-ins included (execExpr.c ExecInitFunc(): InvokeFunctionExecuteHook),
	 * where fmgr_hook never sees a built-in: a set_config() wherever it is
	 * (a view, a column default, a row security policy, an inlined SQL
	 * function, PL/pgSQL, a name spelled with escapes) marks the settings
	 * for a rescan at the transaction's end.
	 */
	if (access == OAT_FUNCTION_EXECUTE)
	{
		if (objectId == F_SET_CONFIG)
			settings_dirty = true;
		/*
		 * The function behind pg_prepared_statements, wherever the query
		 * calls it from (a view over it, an inlined SQL function), whose
		 * text ng_executor_start() does not see: every statement of the
		 * client exists before it lists them.
		 */
		else if (objectId == F_PG_PREPARED_STATEMENT && statements_pending)
			ng_rs_statements_wanted_all();
		return;
	}
	/*
	 * Any class of object: a temporary function, type, operator or the like
	 * pins as a temporary table does (search_path looks in pg_temp first).
	 */
	if (subId != 0)
		return;
	/*
	 * The new pg_class row is not visible yet at OAT_POST_CREATE, so do not
	 * look at it here: any relation created or dropped while this session
	 * has a temp namespace makes the next boundary look for temp relations.
	 */
	if (access == OAT_POST_CREATE || access == OAT_DROP)
	{
		Oid			tempns,
					toastns;

		GetTempNamespaceState(&tempns, &toastns);
		if (OidIsValid(tempns) || access == OAT_POST_CREATE)
			temp_state = TEMP_MAYBE_GONE;
	}
}

/*
 * A statement ran (sequence_pin).  A set_config() it runs is seen by the
 * object-access hook when the executor sets up the call (ng_object_access),
 * wherever the call is: no look at the statement's text here (a scan of
 * every statement's text was 0.4% of a pooled backend's CPU in a profile,
 * issue 15, and found nothing that hook misses).
 */
static ExecutorStart_hook_type prev_executor_start = NULL;

static void
ng_executor_start(QueryDesc *queryDesc, int eflags)
{
	cancel_check();
	statement_ran = true;
	/* The pg_prepared_statements view lists them all. */
	if (statements_pending && queryDesc->sourceText &&
		mentions(queryDesc->sourceText, "pg_prepared_statement"))
		ng_rs_statements_wanted_all();
	if (prev_executor_start)
		prev_executor_start(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

/*
 * A function whose body mentions set_config (PL/pgSQL evaluating it as a
 * simple expression, an SQL function the planner would inline) changes
 * settings without passing the executor or fmgr as set_config itself:
 * claiming it for fmgr_hook keeps it from being inlined and makes every
 * call visible.  needs_fmgr_hook is asked only for non-built-in functions,
 * at planning (inlining) and at fmgr_info time.
 */
static bool
source_mentions_set_config(Oid fn_oid)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn_oid));
	bool		found = false;

	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = SysCacheGetAttr(PROCOID, tup, Anum_pg_proc_prosrc, &isnull);

		if (!isnull)
		{
			char	   *src = TextDatumGetCString(d);

			found = mentions(src, "set_config");
			pfree(src);
		}
		/*
		 * A body in SQL-standard syntax (BEGIN ATOMIC, RETURN) is stored
		 * parsed, its prosrc empty: a call of set_config() in it shows as
		 * the function's OID in the node tree's text.
		 */
		d = SysCacheGetAttr(PROCOID, tup, Anum_pg_proc_prosqlbody, &isnull);
		if (!found && !isnull)
		{
			char	   *body = TextDatumGetCString(d);
			char		needle[32];

			snprintf(needle, sizeof(needle), ":funcid %u ", (unsigned) F_SET_CONFIG);
			found = strstr(body, needle) != NULL;
			pfree(body);
		}
		ReleaseSysCache(tup);
	}
	return found;
}

static bool
ng_needs_fmgr(Oid fn_oid)
{
	if (pooled_backend && (fn_oid == F_SET_CONFIG || source_mentions_set_config(fn_oid)))
		return true;
	return prev_needs_fmgr ? prev_needs_fmgr(fn_oid) : false;
}

static void
ng_fmgr(FmgrHookEventType event, FmgrInfo *flinfo, Datum *private)
{
	/* Any function claimed above (or by a previous hook: harmless). */
	settings_dirty = true;
	if (prev_fmgr)
		prev_fmgr(event, flinfo, private);
}

static void
ng_xact_callback(XactEvent event, void *arg)
{
	/* An aborted CREATE TEMP TABLE leaves no table behind. */
	if ((event == XACT_EVENT_ABORT) &&
		(temp_state == TEMP_PRESENT || temp_state == TEMP_OBJECT_PRESENT))
		temp_state = TEMP_MAYBE_GONE;
	if (event == XACT_EVENT_COMMIT)
		unlisten_apply();
	else if (event == XACT_EVENT_ABORT)
		unlisten_pending_clear();
	/* A failed analysis: the abort undid its settings. */
	if (event == XACT_EVENT_ABORT)
		analysis_nest = 0;
}

/*
 * An UNLISTEN in a subtransaction that rolled back does not take effect:
 * which of the noted ones it was is not known here, so all are forgotten
 * (the client may stay pinned longer than needed: a cost, never a leak).
 */
static void
ng_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		unlisten_pending_clear();
		analysis_nest = 0;
	}
}

/* Postmaster: install the trackers every backend inherits. */
void
ng_install_session_hooks(void)
{
	prev_utility = ProcessUtility_hook;
	ProcessUtility_hook = ng_utility;
	prev_post_parse_analyze = post_parse_analyze_hook;
	post_parse_analyze_hook = ng_post_parse_analyze;
	prev_object_access = object_access_hook;
	object_access_hook = ng_object_access;
	prev_needs_fmgr = needs_fmgr_hook;
	needs_fmgr_hook = ng_needs_fmgr;
	prev_fmgr = fmgr_hook;
	fmgr_hook = ng_fmgr;
	prev_executor_start = ExecutorStart_hook;
	ExecutorStart_hook = ng_executor_start;
	RegisterXactCallback(ng_xact_callback, NULL);
	RegisterSubXactCallback(ng_subxact_callback, NULL);
}

/* Protocol Parse/Close seen by the output layer. */
void
ng_note_statement_messages(void)
{
	statements_dirty = true;
}

/* ------------------------------------------------------------------------
 * Pins: state that cannot move to another backend.
 * ------------------------------------------------------------------------ */

#define NG_PIN_NONE				0
#define NG_PIN_TEMP				1
#define NG_PIN_CURSOR			2
#define NG_PIN_LISTEN			3
#define NG_PIN_LOCK				4
#define NG_PIN_SEQUENCE			5
#define NG_PIN_TEMP_OBJECT		6

/* lastval() as the client last saw it here (see sequence_pin()). */
static bool seq_seen_valid = false;
static int64 seq_seen = 0;
/* The client keeps this backend for its transaction after a nextval(). */
static bool seq_pin_live = false;


/*
 * Hash tables of the server found by name: dynahash gives every table its
 * own memory context under TopMemoryContext, identified by the table's name.
 * The session has sequence values (currval/lastval) when sequence.c's
 * "Sequence values" exists (created by the first nextval() or setval(),
 * destroyed by DISCARD SEQUENCES/ALL); it has had a named prepared statement
 * when prepare.c's "Prepared Queries" exists (created by the first one,
 * never destroyed: DEALLOCATE ALL and DISCARD ALL empty it).
 *
 * Walking all of TopMemoryContext's children at every boundary cost about
 * 1% of a saturated server's CPU (a cache miss per child; perf, issue 15).
 * A new child is always linked in first (MemoryContextCreate,
 * MemoryContextSetParent), so after a full walk that found nothing, the
 * child first then (`walked_to`) and everything behind it need no look
 * again: later walks stop there.  The stop stays until a reset/delete
 * callback forgets it (the next walk is a full one and picks a new stop),
 * so children created after it are looked at every time: a few, for a
 * backend's life.  The same callback forgets the table once found: a
 * context deleted and its memory reused cannot be mistaken for either.
 * TopTransactionContext is never the stop: from 17 on it is kept and reset
 * by every transaction.  (A stop moved to another parent makes every walk
 * a full one; moved away and back under TopMemoryContext, it would hide
 * the children created in between: no PostgreSQL code we know of moves
 * a direct child of TopMemoryContext.)
 */
typedef struct HashWatch
{
	const char *name;
	MemoryContext found;
	MemoryContext walked_to;
	MemoryContextCallback found_gone;
	MemoryContextCallback walked_to_gone;
} HashWatch;

static HashWatch sequence_values = {"Sequence values"};
static HashWatch prepared_queries_table = {"Prepared Queries"};

static void
forget_found(void *arg)
{
	((HashWatch *) arg)->found = NULL;
}

static void
forget_walked_to(void *arg)
{
	((HashWatch *) arg)->walked_to = NULL;
}

static bool
hash_table_exists(HashWatch *w)
{
	MemoryContext c;

	if (w->found != NULL)
		return true;
	for (c = TopMemoryContext->firstchild; c != NULL && c != w->walked_to; c = c->nextchild)
	{
		if (c->ident && strcmp(c->ident, w->name) == 0)
		{
			w->found = c;
			w->found_gone.func = forget_found;
			w->found_gone.arg = w;
			MemoryContextRegisterResetCallback(c, &w->found_gone);
			return true;
		}
	}
	if (w->walked_to == NULL)
	{
		c = TopMemoryContext->firstchild;
		if (c != NULL && c == TopTransactionContext)
			c = c->nextchild;
		if (c != NULL)
		{
			w->walked_to = c;
			w->walked_to_gone.func = forget_walked_to;
			w->walked_to_gone.arg = w;
			MemoryContextRegisterResetCallback(c, &w->walked_to_gone);
		}
	}
	return false;
}

static bool
sequence_values_exist(void)
{
	return hash_table_exists(&sequence_values);
}

/* lastval() in a transaction of its own; false when it has none. */
static bool
current_lastval(int64 *v)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		StartTransactionCommand();
		*v = DatumGetInt64(OidFunctionCall0Coll(F_LASTVAL, InvalidOid));
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return ok;
}

/*
 * Sequence values cannot move (sequence.c has no way to set a session's
 * currval without advancing the sequence), so a client whose transaction
 * called nextval() keeps its backend for its next transaction, where
 * currval()/lastval() answer as on a direct session (the PHP PDO
 * lastInsertId() pattern: INSERT, then SELECT lastval()).  "Called nextval"
 * is seen as lastval() having changed since the last boundary; costs a
 * transaction per boundary only for a client that has sequence values here.
 */
static bool
sequence_pin(bool ran)
{
	int64		v;

	if (!sequence_values_exist() || !current_lastval(&v))
		return seq_pin_live = false;
	if (!seq_seen_valid || v != seq_seen)
		seq_pin_live = true;
	/*
	 * A boundary where nothing ran (Parse/Describe/Sync of a driver that
	 * prepares before it executes) does not use up the next transaction.
	 */
	else if (ran)
		seq_pin_live = false;
	seq_seen = v;
	seq_seen_valid = true;
	return seq_pin_live;
}

static bool
temp_relations_exist(void)
{
	Oid			tempns,
				toastns;
	bool		found = false;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;

	GetTempNamespaceState(&tempns, &toastns);
	if (!OidIsValid(tempns))
		return false;
	ScanKeyInit(&key, Anum_pg_class_relnamespace, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(tempns));
	rel = table_open(RelationRelationId, AccessShareLock);
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 1, &key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * Anything in the session's temporary namespace: every object there but a
 * TOAST table or a relation's row type records a dependency on its
 * namespace (heap.c, pg_proc.c, pg_type.c ...), found through
 * pg_depend's reference index.
 */
static bool
temp_objects_exist(void)
{
	Oid			tempns,
				toastns;
	bool		found;
	Relation	rel;
	ScanKeyData key[2];
	SysScanDesc scan;

	GetTempNamespaceState(&tempns, &toastns);
	if (!OidIsValid(tempns))
		return false;
	ScanKeyInit(&key[0], Anum_pg_depend_refclassid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(NamespaceRelationId));
	ScanKeyInit(&key[1], Anum_pg_depend_refobjid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(tempns));
	rel = table_open(DependRelationId, AccessShareLock);
	scan = systable_beginscan(rel, DependReferenceIndexId, true, NULL, 2, key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * Called at ReadyForQuery(I), outside any transaction.  Returns the reason
 * the client must stay on this backend, or NG_PIN_NONE.
 */
int
ng_pin_reason(void)
{
	ListCell   *lc;
	bool		ran = statement_ran;

	statement_ran = false;
	/*
	 * Conservative: a LISTEN in a transaction that later aborted still pins
	 * until UNLISTEN or the client leaves (a cost, never a leak).
	 */
	if (listen_channels != NIL)
		return NG_PIN_LISTEN;
	foreach(lc, holdable_cursors)
	{
		if (PortalIsValid(GetPortalByName((char *) lfirst(lc))))
			return NG_PIN_CURSOR;
	}
	list_free_deep(holdable_cursors);
	holdable_cursors = NIL;
	if (holds_session_locks())
		return NG_PIN_LOCK;
	if (temp_state == TEMP_MAYBE_GONE)
	{
		MemoryContext cxt = CurrentMemoryContext;

		PG_TRY();
		{
			StartTransactionCommand();
			temp_state = temp_relations_exist() ? TEMP_PRESENT :
				temp_objects_exist() ? TEMP_OBJECT_PRESENT : TEMP_NONE;
			CommitTransactionCommand();
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(cxt);
			FlushErrorState();
			AbortCurrentTransaction();
			temp_state = TEMP_PRESENT; /* when in doubt, stay */
		}
		PG_END_TRY();
		MemoryContextSwitchTo(cxt);
	}
	if (temp_state == TEMP_PRESENT)
		return NG_PIN_TEMP;
	if (temp_state == TEMP_OBJECT_PRESENT)
		return NG_PIN_TEMP_OBJECT;
	if (sequence_pin(ran))
		return NG_PIN_SEQUENCE;
	return NG_PIN_NONE;
}

/* ------------------------------------------------------------------------
 * The session image: settings and prepared statements.
 * ------------------------------------------------------------------------ */

static void
put_str(StringInfo out, const char *s)
{
	appendBinaryStringInfo(out, s, strlen(s) + 1);
}

/*
 * Settings whose "session" source is no session state, so they never move:
 * the transaction characteristics (SET applies them to the transaction under
 * way; SET SESSION CHARACTERISTICS sets the default_transaction_* ones), and
 * seed (SET seed calls setseed(); SHOW seed reads "unavailable", which no SET
 * accepts, and RESET ALL leaves its source, so a client's SET seed would
 * otherwise be replayed as a bad value for every later client of the
 * backend).  Named one by one: a prefix such as "transaction_" would also
 * catch 17's transaction_timeout and custom settings (transaction_ctx.x).
 */
static bool
not_session_state(const char *name)
{
	return strcmp(name, "transaction_isolation") == 0 ||
		strcmp(name, "transaction_read_only") == 0 ||
		strcmp(name, "transaction_deferrable") == 0 ||
		strcmp(name, "seed") == 0;
}

/*
 * Settings the client changed with SET or set_config() (source "session"),
 * as name\0value\0 pairs, session_authorization then role first so the others
 * apply under the right identity.  NULL when nothing changed since the last
 * call.  See not_session_state() for the ones left out.
 */
/*
 * A session setting's value to set again on the next backend: the shown
 * value (PG16 keeps a stale role text after DISCARD), except for a setting
 * only superusers may see (GUC_SUPERUSER_ONLY, set by a superuser login
 * before its SET ROLE): GetConfigOptionByName() checks the current role's
 * privileges there, a catalog lookup that, here outside any transaction,
 * crashes the backend (no resource owner), or raises "permission denied"
 * through the caller's Rust frames; its value itself is read instead.
 */
static const char *
session_value(struct config_generic *g)
{
	MemoryContext cxt = CurrentMemoryContext;
	const char *volatile v = NULL;
	volatile bool failed = false;

	/*
	 * A real in full precision, in its base unit (a number without a unit
	 * is read in that unit): the shown form (%g) keeps 6 digits, and the
	 * client's session would run with the rounded value on its next backend
	 * (as guc.c serializes reals for parallel workers).
	 */
	if (g->vartype == PGC_REAL)
		return psprintf("%.17g", *((struct config_real *) g)->variable);
	if (g->flags & GUC_SUPERUSER_ONLY)
		return GetConfigOption(g->name, true, false);
	PG_TRY();
	{
		v = GetConfigOptionByName(g->name, NULL, true);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		failed = true;
	}
	PG_END_TRY();
	if (failed)
		v = GetConfigOption(g->name, true, false);
	return v;
}

/* What the previous release saw of the settings note_untracked() compares. */
static Oid	seen_role = InvalidOid;
static Oid	seen_session_user = InvalidOid;
static char *seen_search_path = NULL;	/* TopMemoryContext */

/*
 * The identity (SET ROLE, SET SESSION AUTHORIZATION) and search_path, the
 * settings whose silent loss would run the client's next statements with
 * other privileges or other objects, are compared with what the previous
 * release saw: a change the trackers missed (a set_config() that a view, a
 * column default or a row security policy calls) is then read all the same
 * and follows the client.  A few comparisons per transaction.
 */
static void
note_untracked(void)
{
	Oid			role = GetCurrentRoleId();
	Oid			su = GetSessionUserId();
	const char *path = namespace_search_path ? namespace_search_path : "";

	if (role == seen_role && su == seen_session_user &&
		seen_search_path != NULL && strcmp(path, seen_search_path) == 0)
		return;
	settings_dirty = true;
	seen_role = role;
	seen_session_user = su;
	if (seen_search_path)
		pfree(seen_search_path);
	seen_search_path = MemoryContextStrdup(TopMemoryContext, path);
}

/*
 * Ahead of a superuser-only setting's name in the settings image:
 * MARK scontext/srole MARK name.  A byte no GUC name can hold (guc.c
 * valid_custom_variable_name), so no real name is ever read as one.
 */
#define SET_BY_MARK '\x01'

char *
ng_take_session_settings(int *len)
{
	struct config_generic **vars;
	int			n;
	StringInfoData out;

	note_untracked();
	if (!settings_dirty)
		return NULL;
	settings_dirty = false;
	initStringInfo(&out);
	vars = guc_array(&n);
	/*
	 * Pass 0 session_authorization, pass 1 role, pass 2 the others: setting
	 * the session authorization ends a SET ROLE (miscinit.c
	 * SetSessionUserId()), so a role set after it must come after it.
	 */
	for (int pass = 0; pass < 3; pass++)
	{
		for (int i = 0; i < n; i++)
		{
			struct config_generic *g = vars[i];
			int			kind = strcmp(g->name, "session_authorization") == 0 ? 0 :
				strcmp(g->name, "role") == 0 ? 1 : 2;
			const char *v;

			if (g->source != PGC_S_SESSION || kind != pass)
				continue;
			if (not_session_state(g->name))
				continue;
			v = session_value(g);
			if (g->context == PGC_SUSET)
			{
				/*
				 * A superuser-only setting: who set it, and with what
				 * rights, goes with it (see ng_switch_setting).
				 */
				char		origin[64];

				snprintf(origin, sizeof(origin), "%c%d/%u%c", SET_BY_MARK,
						 (int) g->scontext, (unsigned) g->srole, SET_BY_MARK);
				appendStringInfoString(&out, origin);
			}
			put_str(&out, g->name);
			put_str(&out, v ? v : "");
		}
	}
#if PG_VERSION_NUM >= 160000
	pfree(vars);
#endif
	*len = out.len;
	return out.data;
}

/*
 * The result columns a statement was prepared with, as the statement's
 * "result" in the control channel: empty when it returns no rows, else u32
 * count and for each attribute its name (NUL-terminated) and the rest of
 * its fixed part as this server lays it out (attrelid, always 0 in a result
 * description, is left out).  Opaque to everyone but result_desc() below,
 * and only read back by backends of the same server.
 */
#define ATT_REST_OFF	(offsetof(FormData_pg_attribute, attname) + NAMEDATALEN)
#define ATT_REST_LEN	(ATTRIBUTE_FIXED_PART_SIZE - ATT_REST_OFF)

/*
 * Which bytes of an attribute's fixed part are alignment padding, which no
 * one writes (so two equal descriptions can differ there): the bytes that
 * differ between two attributes initialized the same way over 0x00 and
 * over 0xFF.  Zeroed in the encoding, so equal descriptions encode equally.
 */
static const unsigned char *
att_padding(void)
{
	static unsigned char pad[ATTRIBUTE_FIXED_PART_SIZE];
	static bool done = false;

	if (!done)
	{
		TupleDesc	d = CreateTemplateTupleDesc(1);
		unsigned char a[ATTRIBUTE_FIXED_PART_SIZE];

		memset(TupleDescAttr(d, 0), 0x00, ATTRIBUTE_FIXED_PART_SIZE);
		TupleDescInitBuiltinEntry(d, 1, "x", INT4OID, -1, 0);
		memcpy(a, TupleDescAttr(d, 0), ATTRIBUTE_FIXED_PART_SIZE);
		memset(TupleDescAttr(d, 0), 0xFF, ATTRIBUTE_FIXED_PART_SIZE);
		TupleDescInitBuiltinEntry(d, 1, "x", INT4OID, -1, 0);
		for (int i = 0; i < ATTRIBUTE_FIXED_PART_SIZE; i++)
			pad[i] = a[i] != ((unsigned char *) TupleDescAttr(d, 0))[i];
		FreeTupleDesc(d);
		done = true;
	}
	return pad;
}

static void
put_result_desc(StringInfo out, TupleDesc d)
{
	int			at = out->len;
	uint32		v = 0;

	appendBinaryStringInfo(out, (char *) &v, 4);
	if (d)
	{
		const unsigned char *pad = att_padding();

		v = pg_hton32((uint32) d->natts);
		appendBinaryStringInfo(out, (char *) &v, 4);
		for (int i = 0; i < d->natts; i++)
		{
			FormData_pg_attribute a;

			memcpy(&a, TupleDescAttr(d, i), ATTRIBUTE_FIXED_PART_SIZE);
#if PG_VERSION_NUM < 180000
			a.attcacheoff = -1;	/* a cache, set by whoever deforms with it */
#endif
			for (int b = ATT_REST_OFF; b < ATTRIBUTE_FIXED_PART_SIZE; b++)
				if (pad[b])
					((unsigned char *) &a)[b] = 0;
			put_str(out, NameStr(a.attname));
			appendBinaryStringInfo(out, (char *) &a + ATT_REST_OFF, ATT_REST_LEN);
		}
	}
	v = pg_hton32((uint32) (out->len - at - 4));
	memcpy(out->data + at, &v, 4);
}

/* put_result_desc()'s bytes back as a tuple descriptor (NULL: no rows). */
static TupleDesc
result_desc(const char *p, int len)
{
	uint32		n;
	TupleDesc	d;
	const char *end = p + len;

	if (len < 4)
		return NULL;
	memcpy(&n, p, 4);
	n = pg_ntoh32(n);
	p += 4;
	if (n > (uint32) len)
		elog(ERROR, "malformed result description");
	d = CreateTemplateTupleDesc((int) n);
	for (uint32 i = 0; i < n; i++)
	{
		Form_pg_attribute a = TupleDescAttr(d, i);
		const char *name = p;
		const char *nul = memchr(p, '\0', end - p);

		if (nul == NULL || end - (nul + 1) < (long) ATT_REST_LEN)
			elog(ERROR, "malformed result description");
		memset(a, 0, ATT_REST_OFF);
		namestrcpy(&a->attname, name);
		memcpy((char *) a + ATT_REST_OFF, nul + 1, ATT_REST_LEN);
		p = nul + 1 + ATT_REST_LEN;
		attr_written(d, i);
	}
	if (p != end)
		elog(ERROR, "malformed result description");
	return d;
}

/*
 * raw_parser() on a statement's text as the server lexed it when the client
 * prepared it (backslash_escapes: standard_conforming_strings was off, so a
 * backslash in a plain '...' literal escapes), and without the lexer's
 * WARNINGs and NOTICEs (escape_string_warning, an identifier truncated):
 * the client had those at its PREPARE, and a direct session never shows
 * them again.  Both settings are plain variables the lexer reads
 * (scan.l scanner_init, elog.c errstart), put back whatever happens.
 */
static List *
quiet_raw_parse(const char *text, bool backslash_escapes)
{
	bool		save_scs = standard_conforming_strings;
	int			save_client = client_min_messages;
	int			save_log = log_min_messages;
	List	   *volatile raw = NIL;

	standard_conforming_strings = !backslash_escapes;
	client_min_messages = ERROR;
	log_min_messages = ERROR;
	PG_TRY();
	{
		raw = raw_parser(text, RAW_PARSE_DEFAULT);
	}
	PG_FINALLY();
	{
		standard_conforming_strings = save_scs;
		client_min_messages = save_client;
		log_min_messages = save_log;
	}
	PG_END_TRY();
	return raw;
}

/*
 * Was this statement's text lexed with standard_conforming_strings off?
 * Only a backslash can make the two lexings differ; then the text is lexed
 * both ways and compared with the parse tree the server kept (equal()
 * ignores token locations).  Anything unclear (a lexing that fails, neither
 * equal): the current setting, as before.
 */
static bool
lexed_with_backslash_escapes(CachedPlanSource *src, const char *text, bool from_sql)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool escapes = !standard_conforming_strings;

	if (strchr(text, '\\') == NULL || src->raw_parse_tree == NULL)
		return false;
	PG_TRY();
	{
		for (int off = 0; off < 2; off++)
		{
			List	   *raw = quiet_raw_parse(text, off == 1);
			Node	   *stmt;

			if (list_length(raw) != 1)
				continue;
			stmt = linitial_node(RawStmt, raw)->stmt;
			if (from_sql)
			{
				if (!IsA(stmt, PrepareStmt))
					continue;
				stmt = ((PrepareStmt *) stmt)->query;
			}
			if (equal(stmt, src->raw_parse_tree->stmt))
			{
				escapes = (off == 1);
				break;
			}
		}
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	return escapes;
}

/* ------------------------------------------------------------------------
 * The settings a statement's parse analysis ran under.
 *
 * Parse analysis builds some settings into the query it makes: a literal's
 * type input reads DateStyle, IntervalStyle, TimeZone,
 * timezone_abbreviations, lc_monetary, array_nulls and xmloption, and
 * transform_null_equals rewrites `= NULL`.  A direct session keeps the query
 * its Parse or PREPARE made until an invalidation makes the server analyze
 * it again, under the settings of that moment.  A statement created again
 * on another backend is analyzed there at its first use, so each statement
 * carries the settings its last analysis ran under, those that differ from
 * the session's reset values (the client's login values, alike on every
 * backend that serves it), and its first analysis there runs under them.
 *
 * The plan cache analyzes a statement again through the statement's
 * parserSetup hook when it has one (plancache.c RevalidateCachedQuery());
 * nextgres sets it on the statements it creates, and on the client's own
 * right after their PREPARE (utility hook) or Parse (its ParseComplete),
 * noting the settings then.  The hook gives the parser the statement's
 * fixed parameter types, as the plan cache does without one, then applies
 * the carried settings (the first analysis of a created statement) or notes
 * the ones in force (any later analysis).  Applied ones are undone right
 * after the analysis (post_parse_analyze_hook), or by the abort when it
 * fails.
 * ------------------------------------------------------------------------ */

static const char *const analysis_gucs[] = {
	"DateStyle", "IntervalStyle", "TimeZone", "timezone_abbreviations",
	"lc_monetary", "array_nulls", "xmloption", "transform_null_equals",
	/*
	 * Noted, never applied: the plan cache analyzes a statement again when
	 * the search_path differs from its analysis's (RevalidateCachedQuery()),
	 * so a statement whose path changed is analyzed under the settings of
	 * its moment (analysis_path_changed()).
	 */
	"search_path"
};
#define ANALYSIS_PATH (lengthof(analysis_gucs) - 1)

/* A statement's analysis settings: its plan source's parserSetupArg. */
typedef struct NgAnalysis
{
	CachedPlanSource *src;
	bool		pending;		/* apply them at the next analysis */
	int			count;			/* name\0value\0 pairs in `settings` */
	char	   *settings;		/* in src->context, NULL when none */
	int			len;
	bool		invalid_written;	/* the last image had it invalidated */
	/* What its analysis depended on there, while `pending` (deps_of()). */
	int			nrels;
	Oid		   *rels;
	int			nitems;
	uint32	   *items;			/* cache id, hash value, ... */
	dlist_node	node;			/* in `analyses` */
	MemoryContextCallback gone; /* unlinks it when the statement goes */
} NgAnalysis;

/*
 * A statement's dependencies travel with its settings, as two pairs whose
 * names no setting has: DEPS_RELATIONS ("oid,oid,...": its plan source's
 * relationOids) and DEPS_ITEMS ("cacheid:hash,...": its invalItems), so that
 * one created here and not analyzed yet loses its settings on the
 * invalidations that would have hit it on the backend it was analyzed on,
 * as plancache.c PlanCacheRelCallback()/PlanCacheObjectCallback() decide.
 */
#define DEPS_RELATIONS "\x01relations"
#define DEPS_ITEMS "\x01items"

/*
 * Every statement with analysis settings here, and whether an invalidation
 * (or a first analysis, which may fail) came since the list was last
 * compared with what the image says (analysis_changed()).
 *
 * A direct session analyzes a statement again, under the settings of that
 * moment, once an invalidation hit it.  So a statement invalidated since
 * its analysis here goes into the image as such (flag 16: no settings), and
 * one created here whose first analysis has not run yet (`pending`) loses
 * its settings when an invalidation comes that would have hit it where it
 * was analyzed: one of its dependencies (DEPS_*), or what makes the plan
 * cache reset every statement (plancache.c PlanCacheSysCallback(): a
 * schema, operator, operator family, foreign server or wrapper changed).
 */
static dlist_head analyses = DLIST_STATIC_INIT(analyses);
static bool analysis_check = false;
static bool analysis_callbacks = false;

/*
 * The invalidations this backend has seen since the client's statements
 * came (its switch here, ng_analysis_new_client()): a statement of the
 * client's still to be analyzed here (created or not) that one of them
 * would have hit on a direct connection is analyzed under the settings of
 * its moment (analysis_lost()).  Past INVAL_LOG distinct relations or
 * items, any relation or item counts as hit.
 */
#define INVAL_LOG 64
static bool inval_reset_all = false;	/* every statement */
static bool inval_any_relation = false;
static int	inval_nrels = 0;
static Oid	inval_rels[INVAL_LOG];
static bool inval_any_item = false;
static int	inval_nitems = 0;
static uint32 inval_items[2 * INVAL_LOG];
/* Invalidations logged, and how many of them the last image had seen. */
static uint64 inval_logged = 0;
static uint64 inval_imaged = 0;

static void
inval_log_reset(void)
{
	inval_reset_all = inval_any_relation = inval_any_item = false;
	inval_nrels = inval_nitems = 0;
}

static void
analysis_relcache_inval(Datum arg, Oid relid)
{
	analysis_check = true;
	inval_logged++;
	for (int k = 0; k < inval_nrels; k++)
		if (inval_rels[k] == relid)
			return;
	if (relid == InvalidOid || inval_nrels == INVAL_LOG)
		inval_any_relation = true;
	else
		inval_rels[inval_nrels++] = relid;
}

static void
analysis_syscache_inval(Datum arg, int cacheid, uint32 hashvalue)
{
	analysis_check = true;
	inval_logged++;
	for (int k = 0; k < inval_nitems; k++)
		if (inval_items[2 * k] == (uint32) cacheid && inval_items[2 * k + 1] == hashvalue)
			return;
	if (DatumGetBool(arg))
		inval_reset_all = true;
	else if (inval_nitems == INVAL_LOG)
		inval_any_item = true;
	else
	{
		inval_items[2 * inval_nitems] = (uint32) cacheid;
		inval_items[2 * inval_nitems + 1] = hashvalue;
		inval_nitems++;
	}
}

/*
 * Would an invalidation seen since the client's statements came have hit
 * the statement where it was analyzed (plancache.c PlanCacheRelCallback(),
 * PlanCacheObjectCallback(), PlanCacheSysCallback())?
 */
static bool
analysis_lost(NgAnalysis *a)
{
	if (inval_reset_all || (inval_any_relation && a->nrels > 0) || (inval_any_item && a->nitems > 0))
		return true;
	for (int i = 0; i < a->nrels; i++)
		for (int k = 0; k < inval_nrels; k++)
			if (a->rels[i] == inval_rels[k])
				return true;
	for (int i = 0; i < a->nitems; i++)
		for (int k = 0; k < inval_nitems; k++)
			if (a->items[2 * i] == inval_items[2 * k] &&
				(inval_items[2 * k + 1] == 0 || a->items[2 * i + 1] == inval_items[2 * k + 1]))
				return true;
	return false;
}

static void analysis_read(NgAnalysis *a, const char *pairs, int count);

/* Any invalidation since the client's statements came. */
static bool
inval_seen(void)
{
	return inval_reset_all || inval_any_relation || inval_any_item || inval_nrels > 0 || inval_nitems > 0;
}

/*
 * backend/session.rs note_release(): would an invalidation seen since the
 * client's statements came have hit the statement whose analysis pairs (`count` of them,
 * name\0value\0) these are, one the client has not used here?
 */
bool		ng_analysis_hit(const char *pairs, int count);
bool
ng_analysis_hit(const char *pairs, int count)
{
	NgAnalysis	a;
	bool		hit;

	if (!inval_seen())
		return false;
	memset(&a, 0, sizeof(a));
	analysis_read(&a, pairs, count);
	hit = analysis_lost(&a);
	if (a.settings)
		pfree(a.settings);
	if (a.rels)
		pfree(a.rels);
	if (a.items)
		pfree(a.items);
	return hit;
}

/* Once per backend, before its first client's statements. */
static void
analysis_callbacks_register(void)
{
	/* The ones that reset every statement (arg true), then those that do not. */
	static const int reset_all[] = {NAMESPACEOID, OPEROID, AMOPOPID, FOREIGNSERVEROID, FOREIGNDATAWRAPPEROID};

	if (analysis_callbacks)
		return;
	for (int i = 0; i < lengthof(reset_all); i++)
		CacheRegisterSyscacheCallback(reset_all[i], analysis_syscache_inval, BoolGetDatum(true));
	CacheRegisterSyscacheCallback(PROCOID, analysis_syscache_inval, BoolGetDatum(false));
	CacheRegisterSyscacheCallback(TYPEOID, analysis_syscache_inval, BoolGetDatum(false));
	CacheRegisterRelcacheCallback(analysis_relcache_inval, (Datum) 0);
	analysis_callbacks = true;
}

/*
 * The statement's dependencies as DEPS_* pairs appended to `out`; the
 * number of pairs.  Those of its analysis here, or, not analyzed yet, the
 * ones it came with.
 */
static int
deps_of(NgAnalysis *a, StringInfo out)
{
	int			nrels = a->nrels;
	const Oid  *rels = a->rels;
	int			nitems = a->nitems;
	const uint32 *items = a->items;
	int			pairs = 0;

	if (!a->pending)
	{
		ListCell   *lc;
		Oid		   *r = palloc(sizeof(Oid) * (list_length(a->src->relationOids) + 1));
		uint32	   *it = palloc(sizeof(uint32) * 2 * (list_length(a->src->invalItems) + 1));

		nrels = nitems = 0;
		foreach(lc, a->src->relationOids)
			r[nrels++] = lfirst_oid(lc);
		foreach(lc, a->src->invalItems)
		{
			PlanInvalItem *item = (PlanInvalItem *) lfirst(lc);

			it[2 * nitems] = (uint32) item->cacheId;
			it[2 * nitems + 1] = item->hashValue;
			nitems++;
		}
		rels = r;
		items = it;
	}
	if (nrels > 0)
	{
		appendBinaryStringInfo(out, DEPS_RELATIONS, sizeof(DEPS_RELATIONS));
		for (int i = 0; i < nrels; i++)
			appendStringInfo(out, "%s%u", i ? "," : "", rels[i]);
		appendStringInfoChar(out, '\0');
		pairs++;
	}
	if (nitems > 0)
	{
		appendBinaryStringInfo(out, DEPS_ITEMS, sizeof(DEPS_ITEMS));
		for (int i = 0; i < nitems; i++)
			appendStringInfo(out, "%s%u:%u", i ? "," : "", items[2 * i], items[2 * i + 1]);
		appendStringInfoChar(out, '\0');
		pairs++;
	}
	if (!a->pending)
	{
		pfree((void *) rels);
		pfree((void *) items);
	}
	return pairs;
}

/* A DEPS_* value read back into `a` (in the current memory context). */
static void
deps_read(NgAnalysis *a, const char *name, const char *value)
{
	bool		rels = strcmp(name, DEPS_RELATIONS) == 0;
	int			n = 1;
	uint32	   *v;
	int			k = 0;
	const char *p = value;

	if (!rels && strcmp(name, DEPS_ITEMS) != 0)
		return;

	for (const char *c = value; *c; c++)
		n += (*c == ',');
	v = palloc(sizeof(uint32) * n * (rels ? 1 : 2));
	while (*p && k < n)
	{
		char	   *end;
		unsigned long x = strtoul(p, &end, 10);

		if (rels)
			v[k] = (uint32) x;
		else
		{
			v[2 * k] = (uint32) x;
			v[2 * k + 1] = (uint32) strtoul(*end == ':' ? end + 1 : end, &end, 10);
		}
		k++;
		p = *end == ',' ? end + 1 : end;
		if (end == p && *p != '\0')
			break;
	}
	if (rels)
	{
		a->rels = (Oid *) v;
		a->nrels = k;
	}
	else
	{
		a->items = v;
		a->nitems = k;
	}
}

/*
 * An image's analysis pairs (`count` name\0value\0 pairs) read into `a`:
 * the settings, and the DEPS_* dependencies (in the current memory context).
 */
static void
analysis_read(NgAnalysis *a, const char *pairs, int count)
{
	const char *p = pairs;
	StringInfoData set;

	initStringInfo(&set);
	for (int k = 0; k < count; k++)
	{
		const char *v = p + strlen(p) + 1;

		if (p[0] == '\x01')
			deps_read(a, p, v);
		else
		{
			appendBinaryStringInfo(&set, p, strlen(p) + 1);
			appendBinaryStringInfo(&set, v, strlen(v) + 1);
			a->count++;
		}
		p = v + strlen(v) + 1;
	}
	a->len = set.len;
	if (a->len > 0)
		a->settings = set.data;
	else
		pfree(set.data);
}

static void
analysis_forget(void *arg)
{
	dlist_delete(&((NgAnalysis *) arg)->node);
}

/* Lists `a` (allocated in its statement's context, which unlists it). */
static void
analysis_track(NgAnalysis *a)
{
	analysis_callbacks_register();
	dlist_push_tail(&analyses, &a->node);
	a->gone.func = analysis_forget;
	a->gone.arg = a;
	MemoryContextRegisterResetCallback(a->src->context, &a->gone);
}

/* Whether the image would now say of a statement what it did not: invalidated. */
static bool
analysis_invalid(NgAnalysis *a)
{
	return !a->src->is_valid && (!a->pending || analysis_lost(a));
}

/* Something the image says of the statements changed since the last image. */
static bool
analysis_changed(void)
{
	dlist_iter	it;

	if (!analysis_check)
		return false;
	analysis_check = false;
	dlist_foreach(it, &analyses)
	{
		NgAnalysis *a = dlist_container(NgAnalysis, node, it.cur);

		if (analysis_invalid(a) != a->invalid_written)
			return true;
	}
	return false;
}

/* g's value as set_config_option() takes it; *at_reset: is it the reset value? */
static const char *
guc_value(struct config_generic *g, bool *at_reset)
{
	*at_reset = true;
	switch (g->vartype)
	{
		case PGC_BOOL:
			{
				struct config_bool *c = (struct config_bool *) g;

				*at_reset = *c->variable == c->reset_val;
				return *c->variable ? "on" : "off";
			}
		case PGC_ENUM:
			{
				struct config_enum *c = (struct config_enum *) g;

				*at_reset = *c->variable == c->reset_val;
				return config_enum_lookup_by_value(c, *c->variable);
			}
		case PGC_STRING:
			{
				struct config_string *c = (struct config_string *) g;
				const char *v = *c->variable ? *c->variable : "";

				*at_reset = strcmp(v, c->reset_val ? c->reset_val : "") == 0;
				return v;
			}
		default:
			return NULL;		/* no such setting in analysis_gucs */
	}
}

/* Notes the analysis settings in force now as the statement's. */
static void
analysis_note(NgAnalysis *a)
{
	StringInfoData buf;
	MemoryContext old = MemoryContextSwitchTo(a->src->context);

	initStringInfo(&buf);
	a->count = 0;
	for (int i = 0; i < lengthof(analysis_gucs); i++)
	{
		struct config_generic *g = lookup_guc(analysis_gucs[i]);
		bool		at_reset;
		const char *v = g ? guc_value(g, &at_reset) : NULL;

		if (v == NULL || at_reset)
			continue;
		appendBinaryStringInfo(&buf, analysis_gucs[i], strlen(analysis_gucs[i]) + 1);
		appendBinaryStringInfo(&buf, v, strlen(v) + 1);
		a->count++;
	}
	if (a->settings)
		pfree(a->settings);
	a->settings = NULL;
	a->len = 0;
	if (a->count > 0)
	{
		a->settings = buf.data;
		a->len = buf.len;
	}
	else
		pfree(buf.data);
	MemoryContextSwitchTo(old);
}

/* Whether `a` notes the same settings as the len bytes at `settings`. */
static bool
analysis_same(NgAnalysis *a, const char *settings, int len)
{
	return a->len == len && (len == 0 || memcmp(a->settings, settings, len) == 0);
}

/*
 * Sets the statement's analysis settings, and the others of analysis_gucs
 * back to their reset values, for one analysis.
 */
/* The value `a` notes for analysis_gucs[i], NULL for the reset value. */
static const char *
analysis_want(NgAnalysis *a, int i)
{
	const char *p = a->settings;

	for (int k = 0; k < a->count; k++)
	{
		const char *v = p + strlen(p) + 1;

		if (strcmp(p, analysis_gucs[i]) == 0)
			return v;
		p = v + strlen(v) + 1;
	}
	return NULL;
}

/* Whether setting g now has the value `want` (NULL: its reset value). */
static bool
analysis_holds(struct config_generic *g, const char *want)
{
	bool		at_reset;
	const char *now = guc_value(g, &at_reset);

	return now == NULL || (want == NULL ? at_reset : strcmp(now, want) == 0);
}

/* The search_path differs from the one of the statement's analysis. */
static bool
analysis_path_changed(NgAnalysis *a)
{
	struct config_generic *g = lookup_guc(analysis_gucs[ANALYSIS_PATH]);

	return g != NULL && !analysis_holds(g, analysis_want(a, ANALYSIS_PATH));
}

static void
analysis_apply(NgAnalysis *a)
{
	for (int i = 0; i < ANALYSIS_PATH; i++)
	{
		struct config_generic *g = lookup_guc(analysis_gucs[i]);
		const char *want = analysis_want(a, i);

		if (g == NULL || analysis_holds(g, want))
			continue;
		if (analysis_nest == 0)
			analysis_nest = NewGUCNestLevel();
		/* As a function's SET clause, undone at the nest level's end. */
		(void) set_config_option(analysis_gucs[i], want, PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, DEBUG1, false);
	}
}

/* The plan cache's call before it analyzes a statement again. */
static void
ng_parser_setup(struct ParseState *pstate, void *arg)
{
	NgAnalysis *a = (NgAnalysis *) arg;

	if (a->src->num_params > 0)
		setup_parse_fixed_parameters(pstate, a->src->param_types, a->src->num_params);
	/* It may fail, and leave the statement invalidated: compared at release. */
	analysis_check = true;
	if (a->pending && !analysis_lost(a) && !analysis_path_changed(a))
	{
		a->pending = false;
		analysis_apply(a);
	}
	else
	{
		int			was_len = a->len;
		char	   *was = was_len > 0 ? palloc(was_len) : NULL;

		if (was)
			memcpy(was, a->settings, was_len);
		a->pending = false;
		analysis_note(a);
		/* Settings that differ from the image's: read again at release. */
		if (!analysis_same(a, was, was_len))
			statements_dirty = true;
		if (was)
			pfree(was);
	}
}

/* After an analysis: undo the settings applied for it. */
static void
analysis_done(void)
{
	int			nest = analysis_nest;

	if (nest > 0)
	{
		analysis_nest = 0;
		AtEOXact_GUC(true, nest);
	}
}

/*
 * The statement's analysis settings, its parserSetup hook set on first
 * sight with the settings in force: right after its PREPARE or Parse, the
 * ones it was analyzed under.  A Parse the ring of ng_note_parse_complete()
 * missed is first seen when the client's statements are read at its
 * release, and gets the settings of that moment.  NULL for a statement that
 * is not analyzed (utility statements, empty text).
 */
static struct NgAnalysis *
analysis_of(CachedPlanSource *src)
{
	NgAnalysis *a;

	if (src->parserSetup == ng_parser_setup)
		return (NgAnalysis *) src->parserSetupArg;
	if (src->parserSetup != NULL || src->raw_parse_tree == NULL ||
		!stmt_requires_parse_analysis(src->raw_parse_tree))
		return NULL;
	a = MemoryContextAllocZero(src->context, sizeof(NgAnalysis));
	a->src = src;
	analysis_note(a);
	analysis_track(a);
	src->parserSetup = ng_parser_setup;
	src->parserSetupArg = a;
	return a;
}

static void
put_statement(StringInfo out, PreparedStatement *ps)
{
	CachedPlanSource *src = ps->plansource;
	const char *text = src->query_string;
	uint32		np = pg_hton32((uint32) src->num_params);
	int			text_at;
	bool		whole = false;
	NgAnalysis *a = analysis_of(src);
	bool		invalid = a != NULL && analysis_invalid(a);
	StringInfoData deps;
	int			ndeps = 0;
	bool		analysis;

	initStringInfo(&deps);
	if (a != NULL && !invalid)
		ndeps = deps_of(a, &deps);
	analysis = a != NULL && !invalid && a->count + ndeps > 0;

	put_str(out, ps->stmt_name);
	text_at = out->len;
	if (ps->from_sql && src->raw_parse_tree)
	{
		/* Only the PREPARE command itself, not its neighbours in the string. */
		int			loc = src->raw_parse_tree->stmt_location;
		int			len = src->raw_parse_tree->stmt_len;
		int			total = (int) strlen(text);

		if (loc < 0 || loc > total)
			loc = 0;
		if (len <= 0 || loc + len > total)
			len = total - loc;
		/* The plan source's string is this text alone: nothing of another
		 * statement (or another client's, if kept for one) is in it. */
		whole = loc == 0 && len == total;
		appendBinaryStringInfo(out, text + loc, len);
		appendStringInfoChar(out, '\0');
	}
	else
		put_str(out, text);
	/*
	 * Flags (control.rs Statement): 1 from_sql, 2 backslash_escapes, 4 an
	 * SQL-level statement's text is its whole query string, 8 analysis
	 * settings follow the result columns, 16 invalidated since its analysis
	 * (the next one runs under the settings of its moment).
	 */
	if (a)
		a->invalid_written = invalid;
	appendStringInfoChar(out, (ps->from_sql ? 1 : 0) |
						 (lexed_with_backslash_escapes(src, out->data + text_at, ps->from_sql) ? 2 : 0) |
						 (whole ? 4 : 0) | (analysis ? 8 : 0) | (invalid ? 16 : 0));
	appendBinaryStringInfo(out, (char *) &np, 4);
	for (int i = 0; i < src->num_params; i++)
	{
		uint32		t = pg_hton32(src->param_types[i]);

		appendBinaryStringInfo(out, (char *) &t, 4);
	}
	put_result_desc(out, src->resultDesc);
	if (analysis)
	{
		uint32		n = pg_hton32((uint32) (a->count + ndeps));

		appendBinaryStringInfo(out, (char *) &n, 4);
		if (a->len > 0)
			appendBinaryStringInfo(out, a->settings, a->len);
		appendBinaryStringInfo(out, deps.data, deps.len);
	}
	pfree(deps.data);
}

/*
 * The client's named prepared statements in the control-channel format
 * (u32 count, then name\0 text\0 from_sql u8 nparams u32 types u32*; names
 * and texts are bytes in the database encoding).  NULL with *len 0 when they
 * cannot have changed, NULL with *len -1 when they could not be read.  The only iterator over the server's
 * prepared-statement table is pg_prepared_statement(), called directly.
 * A Parse of a named statement, any Close, PREPARE or DEALLOCATE marks them
 * for a rescan (ng_note_parse_complete: a Parse of the unnamed one does not).
 */
char *
ng_take_statements(int *len)
{
	MemoryContext cxt = CurrentMemoryContext;
	StringInfoData out;
	volatile bool ok = true;

	/*
	 * A statement the client has not used here may have been invalidated
	 * since the last image (note_release() asks ng_analysis_hit()).
	 */
	if (analysis_changed() || (statements_pending && inval_logged != inval_imaged))
		statements_dirty = true;
	inval_imaged = inval_logged;
	if (!statements_dirty)
		return NULL;
	statements_dirty = false;

	initStringInfo(&out);
	appendBinaryStringInfo(&out, "\0\0\0\0", 4);
	/*
	 * No named statement was ever prepared here: the list is empty, as
	 * pg_prepared_statement() would return it, without the transaction
	 * that calls it.  A Parse whose name was not read (the client's
	 * recv() not watched) makes the statements dirty at each
	 * ParseComplete, so this saves a transaction per transaction of such
	 * a client.
	 */
	if (!hash_table_exists(&prepared_queries_table))
	{
		*len = out.len;
		return out.data;
	}
	PG_TRY();
	{
		LOCAL_FCINFO(fcinfo, 0);
		FmgrInfo	flinfo;
		ReturnSetInfo rsinfo;
		TupleTableSlot *slot;
		uint32		count = 0;

		StartTransactionCommand();
		fmgr_info(F_PG_PREPARED_STATEMENT, &flinfo);
		memset(&rsinfo, 0, sizeof(rsinfo));
		rsinfo.type = T_ReturnSetInfo;
		rsinfo.econtext = CreateStandaloneExprContext();
		rsinfo.allowedModes = SFRM_Materialize;
		InitFunctionCallInfoData(*fcinfo, &flinfo, 0, InvalidOid, NULL, (Node *) &rsinfo);
		(void) FunctionCallInvoke(fcinfo);
		if (rsinfo.setResult)
		{
			slot = MakeSingleTupleTableSlot(rsinfo.setDesc, &TTSOpsMinimalTuple);
			while (tuplestore_gettupleslot(rsinfo.setResult, true, false, slot))
			{
				bool		isnull;
				Datum		d = slot_getattr(slot, 1, &isnull);
				PreparedStatement *ps;

				if (isnull)
					continue;
				ps = FetchPreparedStatement(TextDatumGetCString(d), false);
				if (ps)
				{
					put_statement(&out, ps);
					count++;
				}
			}
			ExecDropSingleTupleTableSlot(slot);
			tuplestore_end(rsinfo.setResult);
		}
		FreeExprContext(rsinfo.econtext, true);
		CommitTransactionCommand();
		count = pg_hton32(count);
		memcpy(out.data, &count, 4);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	if (!ok)
	{
		/* Unknown, not unchanged: *len -1, and rescan at the next call. */
		pfree(out.data);
		statements_dirty = true;
		*len = -1;
		return NULL;
	}
	*len = out.len;
	return out.data;
}

void
ng_free(void *p)
{
	if (p)
		pfree(p);
}

/* ------------------------------------------------------------------------
 * Restoring a client's session on this backend.
 * ------------------------------------------------------------------------ */

/*
 * The next client's session would be identical to the one left here (same
 * startup settings, nothing set, the same prepared statements): skip
 * DISCARD ALL, but forget the sequence values, which currval()/lastval()
 * would otherwise show.
 *
 * "Nothing set" is what the trackers saw (every SQL-level set_config() is
 * seen: ng_object_access); a role or session authorization in force all the
 * same (set by other C code) makes it return false, and the caller makes a
 * full switch (DISCARD ALL). (A RESET ALL here as well cost 1% of a
 * saturated server's CPU, measured: no.)
 */
bool
ng_switch_light(void)
{
	if (OidIsValid(GetCurrentRoleId()) || GetSessionUserId() != GetAuthenticatedUserId())
		return false;
	ResetSequenceCaches();
	seq_seen_valid = seq_pin_live = false;
	return true;
}

/*
 * A switch to another client begins: random() and friends get a fresh seed
 * (from this backend's global generator, itself strongly seeded at its
 * start), as a direct session starts with its own.  Without it, a client's
 * setseed() (or SET seed) decided the "random" values of every client the
 * backend served after it.  (A client's own seed does not follow it to
 * another backend either: seed is no session state, not_session_state().)
 */
void
ng_switch_reseed(void)
{
	(void) DirectFunctionCall1(setseed, Float8GetDatum(pg_prng_double(&pg_global_prng_state) * 2.0 - 1.0));
}

/* The settings a client is told of (GUC_REPORT), found at the first switch
 * (guc.c never frees a setting's record; one an extension defines later
 * with GUC_REPORT, which no known extension does, is not in the list), and
 * which of them the client is owed a ParameterStatus of. */
static bool reported_known = false;
static struct config_generic **reported_vars = NULL;
static bool *reported_owed = NULL;
static int	reported_n = 0;

/* The value of a reported setting as ParameterStatus shows it (palloc'd). */
static char *
reported_value(struct config_generic *g)
{
#if PG_VERSION_NUM >= 160000
	return ShowGUCOption(g, false);
#else
	/* 15's _ShowOption() is static; no reported setting has units. */
	return GetConfigOptionByName(g->name, NULL, true);
#endif
}

static void
set_last_reported(struct config_generic *g, const char *v)
{
#if PG_VERSION_NUM >= 160000
	guc_free(g->last_reported);
	g->last_reported = v ? guc_strdup(LOG, v) : NULL;
#else
	free(g->last_reported);
	g->last_reported = v ? strdup(v) : NULL;
#endif
}

/* The reported settings' list, built once; false if it could not be. */
static bool
reported_init(void)
{
	if (!reported_known)
	{
		int			n;
		struct config_generic **vars = guc_array(&n);
		struct config_generic **list = malloc(sizeof(*list) * Max(n, 1));
		bool	   *flags = calloc(Max(n, 1), sizeof(bool));

		if (list == NULL || flags == NULL)
		{
			free(list);
			free(flags);
#if PG_VERSION_NUM >= 160000
			pfree(vars);
#endif
			return false;
		}
		reported_vars = list;
		reported_owed = flags;
		reported_n = 0;
		for (int i = 0; i < n; i++)
			if ((vars[i]->flags & GUC_REPORT) && !(vars[i]->flags & GUC_SUPERUSER_ONLY))
				reported_vars[reported_n++] = vars[i];
#if PG_VERSION_NUM >= 160000
		pfree(vars);
#endif
		reported_known = true;
	}
	return true;
}

/*
 * A switch to another client ends: guc.c's record of what "the client" was
 * told of each reported setting (last_reported, to which
 * ReportChangedGUCOptions() compares a changed value before it sends
 * ParameterStatus) is still what the previous client was told.  `told`
 * says whether this client was told a setting's value now in force (by its
 * login's ParameterStatus or one a backend sent it since, carried in its
 * session image; compared in the server encoding, as last_reported keeps
 * it); those become last_reported, so a value the client
 * SETs later is reported unless it was told it already, as on a direct
 * connection.  Before, a SET to the value the previous client had been told
 * went unreported: a client that set standard_conforming_strings = off kept
 * being told on, and libpq escaped its strings for on (an SQL injection).
 * A value the client was not told (a reload or a role default changed it
 * under the client, and another client of this backend heard of it) is
 * owed: ng_report_owed() sends it before the next ReadyForQuery, where a
 * direct backend would report it.  The changes the switch made are still
 * flagged and are looked at at the next ReadyForQuery, as guc.c expects of a
 * flagged setting.  Returns whether any ParameterStatus is owed.
 */
bool
ng_switch_reported(bool (*told) (void *arg, const char *name, const char *value), void *arg)
{
	bool		owed = false;

	if (!reported_init())
		return false;
	for (int i = 0; i < reported_n; i++)
	{
		struct config_generic *g = reported_vars[i];
		char	   *v = reported_value(g);

		reported_owed[i] = false;
		if (v == NULL)
			continue;
		/*
		 * Compared in the server encoding, as last_reported keeps it: the
		 * client's encoding may change, and converting could fail (a value
		 * the client would only fail to receive at its next report).
		 */
		if (!told(arg, g->name, v))
		{
			/* guc.c sends a flagged one itself (NULL differs from any value). */
			set_last_reported(g, NULL);
			reported_owed[i] = owed = true;
		}
		else if (g->last_reported == NULL || strcmp(v, g->last_reported) != 0)
			set_last_reported(g, v);
		pfree(v);
	}
	return owed;
}

/*
 * The client's ReadyForQuery is being sent (after ReportChangedGUCOptions()):
 * each setting owed since the switch that guc.c did not report itself gets
 * its ParameterStatus now, as guc.c's ReportGUCOption() builds it.
 */
void
ng_report_owed(void)
{
	for (int i = 0; i < reported_n; i++)
	{
		struct config_generic *g = reported_vars[i];
		StringInfoData msg;
		char	   *v;

		if (!reported_owed[i])
			continue;
		reported_owed[i] = false;
		if (g->last_reported != NULL)
			continue;
		v = reported_value(g);
		if (v == NULL)
			continue;
		pq_beginmessage(&msg, 'S');
		pq_sendstring(&msg, g->name);
		pq_sendstring(&msg, v);
		pq_endmessage(&msg);
		set_last_reported(g, v);
		pfree(v);
	}
}

/*
 * Each reported setting's name and what the client was last told of it
 * (last_reported, in the server encoding; NULL while owed): what the
 * client's image carries after ParameterStatus went out.
 */
void
ng_reported_each(void (*each) (void *arg, const char *name, const char *last), void *arg)
{
	if (!reported_init())
		return;
	for (int i = 0; i < reported_n; i++)
		each(arg, reported_vars[i]->name, reported_vars[i]->last_reported);
}

/*
 * A reload signalled while the backend was parked is read before a switch
 * (PostgresMain() reads it only after the command the switch is part of):
 * the values in force are then the ones the pooler told a client that
 * logged in after it, and the switch's comparison with what the client was
 * told finds no difference the reload would then report a second time.
 */
void		ng_defaults_reload(void);
void
ng_reload_if_pending(void)
{
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ng_defaults_reload();
	}
}

/*
 * A FunctionCall message was answered (the fast-path interface, fastpath.c):
 * it calls functions, set_config() among them, without the executor or
 * fmgr_hook (built-ins skip needs_fmgr_hook): the settings are read again.
 */
void
ng_note_function_call(void)
{
	settings_dirty = true;
}

static void guc_source_to_default(struct config_generic *g);
static void note_start_values(void);

#if PG_VERSION_NUM >= 160000 && PG_VERSION_NUM < 170000
/*
 * 16 only: DISCARD ALL's SET SESSION AUTHORIZATION DEFAULT makes the current
 * role inactive (miscinit.c SetSessionUserId()) but leaves the role
 * setting's text and source as they were, and RESET ALL skips role
 * (GUC_NO_RESET_ALL).  The next client's role default (ALTER ROLE ... SET
 * role), equal to what the setting already says, or its startup role, of a
 * lower source than a previous client's SET ROLE, then never runs
 * assign_role(): the client would act as its login.  Puts role back to its
 * reset value with its reset source, as a fresh login has it (17 and later
 * reset it in SET SESSION AUTHORIZATION itself).
 */
static void
role_as_at_login(void)
{
	struct config_generic *g = find_option("role", false, true, ERROR);
	struct config_string *r = (struct config_string *) g;
	char	   *reset;
	GucSource	src;

	if (g == NULL)
		return;
	reset = pstrdup(r->reset_val ? r->reset_val : "none");
	src = g->reset_source;
	guc_source_to_default(g);
	(void) set_config_option("role", reset, PGC_SUSET, src, GUC_ACTION_SET, true, WARNING, false);
	pfree(reset);
}
#endif

/* Starts the switch: its own transaction, optionally DISCARD ALL first. */
bool
ng_switch_begin(bool discard, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		note_start_values();
		StartTransactionCommand();
		if (discard)
		{
			DiscardStmt stmt;

			memset(&stmt, 0, sizeof(stmt));
			stmt.type = T_DiscardStmt;
			stmt.target = DISCARD_ALL;
			DiscardCommand(&stmt, true);
#if PG_VERSION_NUM >= 160000 && PG_VERSION_NUM < 170000
			role_as_at_login();
#endif
		}
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	/* The trackers describe the new client from here on. */
	settings_dirty = statements_dirty = false;
	seq_seen_valid = seq_pin_live = false;
	list_free_deep(listen_channels);
	listen_channels = NIL;
	unlisten_pending_clear();
	temp_state = TEMP_NONE;
	list_free_deep(holdable_cursors);
	holdable_cursors = NIL;
	return ok;
}

/*
 * Ends the session with the ERROR being handled, as a FATAL with all its
 * fields (a login the server would have refused).  What the client sent
 * meanwhile (its first query, not read yet) is read and dropped first, so
 * that the socket does not close with input unread (which sends a reset
 * rather than an orderly end after the FATAL).
 */
static void
refuse_session(MemoryContext cxt)
{
	ErrorData  *edata;
	char		buf[8192];

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	for (int i = 0; i < 1024; i++)
	{
		if (recv(MyProcPort->sock, buf, sizeof(buf), MSG_DONTWAIT) <= 0)
			break;
	}
	edata->elevel = FATAL;
	ThrowErrorData(edata);
	pg_unreachable();
}

/*
 * One setting, as the startup packet (source "client") or SET (source
 * "session") would make it.  A bad value warns, as it would for the client,
 * or with `refuse` ends the session with the server's own FATAL.
 * False when it was not applied (the caller ends the session when that was
 * its role: see session.rs full_switch).
 */
static bool switch_setting(const char *name, const char *value, bool from_startup,
							bool refuse, int by_context, Oid by_role);
static const char *name_cut(const char *name, const char *value);

bool
ng_switch_setting(const char *name, const char *value, bool from_startup, bool refuse)
{
	int			by_context = -1;
	unsigned	by_role = 0;

	/*
	 * A superuser-only setting carries the context and role that set it in
	 * the client's session (ng_take_session_settings): a superuser's
	 * SECURITY DEFINER function (a PG 17 login event trigger's
	 * set_config('log_statement', 'all', false)), or a role granted SET ON
	 * PARAMETER before a SET ROLE.  It is set again as it was set there
	 * (set_config_option_ext, guc.c), which a direct session keeps for its
	 * whole life; set with the client's rights of now, it was refused and
	 * lost at the next switch.  The marks come from a backend's own
	 * capture, never from a client's bytes.
	 */
	if (!from_startup && name[0] == SET_BY_MARK)
	{
		const char *end = strchr(name + 1, SET_BY_MARK);

		if (end == NULL || sscanf(name + 1, "%d/%u", &by_context, &by_role) != 2)
			return false;
		return switch_setting(end + 1, name_cut(end + 1, value), false, false, by_context, (Oid) by_role);
	}
	return switch_setting(name, name_cut(name, value), from_startup, refuse, -1, InvalidOid);
}

/*
 * A name setting (application_name) longer than a name, cut as the server
 * cut it when the client set it, which said so once (NOTICE 42622): cut
 * before it is set again, so a switch does not say it again at each of the
 * client's statements (hunt12b 1).
 */
static const char *
name_cut(const char *name, const char *value)
{
	char	   *cut;

	if (value == NULL || strlen(value) < NAMEDATALEN ||
		!(GetConfigOptionFlags(name, true) & GUC_IS_NAME))
		return value;
	cut = pstrdup(value);
	truncate_identifier(cut, strlen(cut), false);
	return cut;
}

/* ng_switch_setting() once the name is plain; by_context -1: no mark. */
static bool
switch_setting(const char *name, const char *value, bool from_startup,
			   bool refuse, int by_context, Oid by_role)
{
	MemoryContext cxt = CurrentMemoryContext;

	/*
	 * Every setting here was accepted in this client's session, under its
	 * login or an identity its login could take: a superuser login's are
	 * set with superuser context even after the client's own SET ROLE or
	 * SET SESSION AUTHORIZATION was applied (which come first), as a
	 * superuser-only setting made before them stays on a direct session.
	 */
	volatile int applied = 0;

	PG_TRY();
	{
		/* A catalog read (a lock wait, an interrupt): inside the catch. */
		bool		su = superuser_arg(GetAuthenticatedUserId());

		if (by_context >= 0)
			applied = set_config_option_ext(name, value, (GucContext) by_context,
											PGC_S_SESSION, by_role,
											GUC_ACTION_SET, true, WARNING, false);
		else
			applied = set_config_option(name, value,
										from_startup ? (su ? PGC_SU_BACKEND : PGC_BACKEND)
										: (su ? PGC_SUSET : PGC_USERSET),
										from_startup ? PGC_S_CLIENT : PGC_S_SESSION,
										GUC_ACTION_SET, true, refuse ? ERROR : WARNING, false);
	}
	PG_CATCH();
	{
		if (refuse)
			refuse_session(cxt);
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		applied = 0;
	}
	PG_END_TRY();
	return applied != 0;
}

/* ------------------------------------------------------------------------
 * Creating a switched client's statements when it first uses them.
 *
 * The server reads protocol messages straight from the client socket and
 * looks a named statement up as soon as a Bind, Describe, Close or Parse
 * for it arrives; nothing in between can be hooked.  So a pooled backend
 * with statements still to create watches the bytes the server receives on
 * the client socket (the executable's call of recv() in secure_raw_read(),
 * be-secure.c, redirected through its global offset table), and creates a
 * statement such a message names before recv() returns: the server only
 * looks at a message after it has read all of it.  SQL EXECUTE, DEALLOCATE,
 * PREPARE, EXPLAIN EXECUTE and CREATE TABLE AS EXECUTE are seen by the
 * utility hook, pg_prepared_statements by the executor hook.  Where the
 * redirection cannot be installed, every statement is created at the
 * switch (same behaviour, more work per switch).
 * ------------------------------------------------------------------------ */

typedef ssize_t (*recv_fn) (int, void *, size_t, int);
static recv_fn real_recv = NULL;

/* Stream position: the protocol's 5-byte header, then the body. */
#define SCAN_CAPTURE 1024
static int	scan_hdr_have = 0;
static unsigned char scan_hdr[5];
static uint32 scan_body_left = 0;
static bool scan_capturing = false;
static int	scan_cap_len = 0;
static int	scan_cap_max = SCAN_CAPTURE;
static char scan_cap[SCAN_CAPTURE];

/*
 * Parse messages received and not answered yet, in order, with a mark for
 * each message that ends a cycle with ReadyForQuery (Sync, Query,
 * FunctionCall): the server answers a cycle's Parse messages in order until
 * one fails and skips the rest up to that mark, so at each ParseComplete the
 * first one left is the statement just made (ng_note_parse_complete), and
 * each ReadyForQuery drops what is left of its cycle (ng_note_ready).  Names
 * are in the database encoding; an unnamed or unreadable one is "".  Full
 * or out of step: nothing more is noted until the next attach.
 */
#define PARSE_RING 256
typedef struct ParseSeen
{
	bool		cycle_end;
	/*
	 * A cycle end the server may skip: a Query or FunctionCall sent after
	 * extended-protocol messages with no Sync between, which the server
	 * ignores when one of those failed (it reads on to the next Sync).
	 */
	bool		skippable;
	/* The name was read ("" then is the unnamed statement). */
	bool		known;
	char		name[NAMEDATALEN];
} ParseSeen;
static ParseSeen parse_ring[PARSE_RING];
static int	parse_first = 0;
static int	parse_count = 0;
static bool parse_lost = false;

/*
 * COPY FROM STDIN: the server ignores Sync (and Flush) while it reads copy
 * data (copyfromparse.c CopyGetData()), so a Sync sent after the Execute
 * that starts it (libpq's extended protocol does) gets no ReadyForQuery.
 */
static int	scan_syncs_since_execute = 0;
static bool scan_in_copy = false;
/* Extended-protocol messages received since the last Sync/Query/FunctionCall. */
static bool scan_extended_since_end = false;
/* An ErrorResponse went out since the last ReadyForQuery. */
static bool cycle_error = false;
/* Whole Flush messages received since the last Sync/Query/FunctionCall, and
 * whether anything else came after it (ng_consume_buffered_flushes). */
static int	scan_trailing_flushes = 0;
static bool scan_other_after_end = false;
/* Since the attach: messages received, and whether all were whole Flushes. */
static uint64 scan_since_attach = 0;
static bool scan_only_flushes = true;
/*
 * Messages received by the last ReadyForQuery, and whether the boundary
 * then left the client here for input already buffered (ng_note_idle_input):
 * what idle_input_read() needs to tell input the server read since the
 * client was last idle.
 */
static uint64 scan_at_ready = 0;
static bool idle_input = false;

static void
parse_push(const char *name, bool cycle_end, bool skippable)
{
	ParseSeen  *e;

	if (parse_lost)
		return;
	if (parse_count == PARSE_RING)
	{
		parse_lost = true;
		parse_count = 0;
		return;
	}
	e = &parse_ring[(parse_first + parse_count) % PARSE_RING];
	e->cycle_end = cycle_end;
	e->skippable = skippable;
	e->known = name != NULL;
	strlcpy(e->name, name ? name : "", sizeof(e->name));
	parse_count++;
}

/* A Sync the server ignores (COPY): its mark, the last one, goes. */
static void
parse_unpush_cycle_end(void)
{
	if (parse_count > 0 &&
		parse_ring[(parse_first + parse_count - 1) % PARSE_RING].cycle_end)
		parse_count--;
	else
		parse_lost = true;
}

static ParseSeen *
parse_pop(void)
{
	ParseSeen  *e = &parse_ring[parse_first];

	parse_first = (parse_first + 1) % PARSE_RING;
	parse_count--;
	return e;
}

/* The client was just attached: its next byte starts a message. */
static void
scan_reset(void)
{
	scan_hdr_have = 0;
	scan_body_left = 0;
	scan_capturing = false;
	scan_cap_len = 0;
	parse_first = parse_count = 0;
	parse_lost = false;
	scan_syncs_since_execute = 0;
	scan_in_copy = false;
	scan_extended_since_end = false;
	cycle_error = false;
	scan_trailing_flushes = 0;
	scan_other_after_end = false;
	scan_since_attach = 0;
	scan_only_flushes = true;
	scan_at_ready = 0;
	idle_input = false;
}

/* A message header was received: what the ring and the boundary need of it. */
static void
scan_header(char tag, uint32 len)
{
	scan_since_attach++;
	if (tag != 'H' || len != 4)
		scan_only_flushes = false;
	switch (tag)
	{
		case 'd':				/* CopyData, CopyDone, CopyFail */
		case 'c':
		case 'f':
			if (!scan_in_copy)
			{
				while (scan_syncs_since_execute > 0)
				{
					parse_unpush_cycle_end();
					scan_syncs_since_execute--;
				}
			}
			scan_in_copy = tag == 'd';
			break;
		case 'S':
			if (!scan_in_copy)
			{
				parse_push(NULL, true, false);
				scan_syncs_since_execute++;
			}
			break;
		case 'Q':
		case 'F':
			parse_push(NULL, true, scan_extended_since_end);
			scan_syncs_since_execute = 0;
			break;
		case 'E':
			scan_syncs_since_execute = 0;
			break;
	}
	if (tag == 'S' || tag == 'Q' || tag == 'F')
	{
		scan_trailing_flushes = 0;
		scan_other_after_end = false;
		scan_extended_since_end = false;
	}
	else if (!scan_in_copy && (tag == 'P' || tag == 'B' || tag == 'E' || tag == 'D' || tag == 'C'))
		scan_extended_since_end = true;
	else if (tag == 'H' && len == 4 && !scan_other_after_end)
		scan_trailing_flushes++;
	else
		scan_other_after_end = true;
}

/* backend/session.rs attached_again(): a client is attached. */
void		ng_scan_attach(void);
void
ng_scan_attach(void)
{
	scan_reset();
	analysis_callbacks_register();
}

/*
 * backend/session.rs switch_to(): another client's statements arrive; the
 * invalidations that matter to them are those from now on (the same client
 * attached again keeps its log: its statements not used here yet are the
 * ones it had).
 */
void		ng_analysis_new_client(void);
void
ng_analysis_new_client(void)
{
	inval_log_reset();
}

/*
 * ParseComplete: the statement its Parse made was analyzed under the
 * settings in force now (exec_parse_message() changes none): they are
 * noted as its own before a later SET changes them.  A named one (or one
 * whose name was not read) changed the client's named statements, which
 * are read again at the release (ng_take_statements); the unnamed one,
 * which most drivers parse with every use, changed none of them.  Before,
 * every ParseComplete made the release read, parse and send the whole
 * list, for a client holding hundreds of statements (pgjdbc, psycopg with
 * its unnamed queries besides) a copy of all of them per transaction.
 */
void		ng_note_parse_complete(void);
void
ng_note_parse_complete(void)
{
	ParseSeen  *e;
	PreparedStatement *ps;

	if (parse_lost || parse_count == 0 || parse_ring[parse_first].cycle_end)
	{
		parse_lost = true;
		statements_dirty = true;
		return;
	}
	e = parse_pop();
	if (!e->known || e->name[0])
		statements_dirty = true;
	if (e->name[0] && hash_table_exists(&prepared_queries_table) &&
		(ps = FetchPreparedStatement(e->name, false)) != NULL)
		(void) analysis_of(ps->plansource);
}

/*
 * At ReadyForQuery(I) with input buffered: when all of it is whole Flush
 * messages sent after the Sync this ReadyForQuery answers (psycopg 3's
 * pipeline mode ends with Sync, Flush), they are read here.  They ask for
 * output the boundary has sent already; left buffered, they would keep an
 * idle client on its backend (pipelined input stays with its backend), and
 * the pool's other clients waiting.  True when they were read.
 */
bool		ng_consume_buffered_flushes(void);
bool		ng_read_ahead_pending(void);
bool
ng_consume_buffered_flushes(void)
{
	int			n = scan_trailing_flushes * 5;

	if (n == 0 || scan_other_after_end || parse_lost || parse_count != 0 ||
		scan_hdr_have != 0 || scan_in_copy || ng_read_ahead_pending())
		return false;
#if PG_VERSION_NUM >= 170000
	if (pq_buffer_remaining_data() != (ssize_t) n)
		return false;
#endif
	pq_startmsgread();
	for (int i = 0; i < n; i++)
		(void) pq_getbyte();
	pq_endmsgread();
	scan_trailing_flushes = 0;
	return true;
}

/*
 * The server flushed its output while the client attached here has sent
 * nothing but whole Flush messages (one that came after the ReadyForQuery
 * that let it go, as psycopg 3's pipeline mode can send it): the client is
 * as idle as it was, and nothing will answer it, so it is let go again
 * (comm.rs flush()).  Not inside a transaction, nor with anything
 * unanswered or unread.
 */
bool		ng_only_flushes_since_attach(void);
bool
ng_only_flushes_since_attach(void)
{
	return scan_since_attach > 0 && scan_only_flushes && scan_hdr_have == 0 &&
		parse_count == 0 && !parse_lost && !scan_in_copy &&
		!IsTransactionOrTransactionBlock();
}

/*
 * backend/park.rs transaction_boundary(): at ReadyForQuery(I) the client had
 * sent more, which keeps it here until the server has read it.
 */
void		ng_note_idle_input(void);
void
ng_note_idle_input(void)
{
	idle_input = true;
}

/* An ErrorResponse went out. */
void		ng_note_error(void);
void
ng_note_error(void)
{
	cycle_error = true;
}

/*
 * ReadyForQuery: the cycle's Parse messages not answered were skipped.
 * After an error, the cycle's first end may be a Query the server skipped
 * (it read on to a Sync after a failed extended-protocol message), so this
 * ReadyForQuery may answer a later mark: the ring is out of step, and is
 * dropped until the next attach (every ParseComplete then counts as a named
 * statement's, and a statement's settings are those at the release).
 * Before, the next named Parse's ParseComplete met the skipped cycle's
 * unnamed one, and the statement was left out of the client's image (its
 * Bind failed with 26000 once it moved; hunt12a F1).
 */
void		ng_note_ready(void);
void
ng_note_ready(void)
{
	scan_at_ready = scan_since_attach;
	idle_input = false;
	while (parse_count > 0)
	{
		ParseSeen  *e = parse_pop();

		if (e->cycle_end)
		{
			if (cycle_error && e->skippable)
			{
				parse_lost = true;
				parse_count = 0;
			}
			break;
		}
	}
	cycle_error = false;
}

/* The name at `off` in the captured body, or NULL when it was cut off. */
static const char *
captured_name(int off)
{
	if (off >= scan_cap_len || memchr(scan_cap + off, '\0', scan_cap_len - off) == NULL)
		return NULL;
	return scan_cap + off;
}

/*
 * A name as the client sent it, in the database encoding, as the server
 * reads it (pq_getmsgstring converts; the image keys names that way).  A
 * name that does not convert stays as sent: the server then refuses the
 * message itself.  Converted with the client encoding's cached conversion
 * (no catalog access).  Points into a static buffer.
 */
static const char *
client_name(const char *name)
{
	static char converted[NAMEDATALEN];
	MemoryContext cxt = CurrentMemoryContext;
	const char *volatile result = name;

	if (name == NULL || name[0] == '\0' || pg_get_client_encoding() == GetDatabaseEncoding())
		return name;
	PG_TRY();
	{
		char	   *c = pg_client_to_server(name, strlen(name));

		strlcpy(converted, c, sizeof(converted));
		if (c != name)
			pfree(c);
		result = converted;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	return result;
}

/* A whole message was received: create the statement it names. */
static void
scan_message_done(void)
{
	const char *name = NULL;
	bool		cut = false;

	if (!scan_capturing)
		return;
	scan_capturing = false;
	if (scan_hdr[0] == 'P')
	{
		const char *n = captured_name(0);
		char		cut_name[NAMEDATALEN];

		/* Longer than captured: the server keys it by its first bytes. */
		if (n == NULL && scan_cap_len >= NAMEDATALEN - 1 &&
			pg_get_client_encoding() == GetDatabaseEncoding())
		{
			memcpy(cut_name, scan_cap, NAMEDATALEN - 1);
			cut_name[NAMEDATALEN - 1] = '\0';
			n = cut_name;
		}
		parse_push(n ? client_name(n) : NULL, false, false);
		if (!statements_pending)
			return;
	}
	switch (scan_hdr[0])
	{
		case 'P':				/* Parse: statement name first */
			name = captured_name(0);
			cut = name == NULL;
			break;
		case 'B':				/* Bind: portal name, statement name */
			{
				const char *portal = captured_name(0);

				cut = portal == NULL;
				if (portal)
				{
					name = captured_name(strlen(portal) + 1);
					cut = name == NULL;
				}
			}
			break;
		case 'D':				/* Describe / Close: 'S' or 'P', name */
		case 'C':
			if (scan_cap_len >= 1 && scan_cap[0] == 'S')
			{
				name = captured_name(1);
				cut = name == NULL;
			}
			break;
	}
	if (cut)
		ng_rs_statements_wanted_all();
	else
		want_statement(client_name(name));
}

static void
scan_bytes(const unsigned char *p, size_t len)
{
	while (len > 0)
	{
		if (scan_hdr_have < 5)
		{
			size_t		n = Min(len, (size_t) (5 - scan_hdr_have));

			memcpy(scan_hdr + scan_hdr_have, p, n);
			scan_hdr_have += n;
			p += n;
			len -= n;
			if (scan_hdr_have == 5)
			{
				uint32		l;

				memcpy(&l, scan_hdr + 1, 4);
				l = pg_ntoh32(l);
				scan_body_left = l >= 4 ? l - 4 : 0;
				scan_cap_len = 0;
				/* Parse always (the ring above), the others while statements are pending. */
				scan_capturing = scan_hdr[0] == 'P' ||
					(statements_pending && strchr("BDC", scan_hdr[0]) != NULL && scan_hdr[0] != '\0');
				/* For the ring alone, a Parse's name is all it needs (not its query). */
				scan_cap_max = statements_pending ? SCAN_CAPTURE : 4 * NAMEDATALEN;
				scan_header(scan_hdr[0], l);
				if (scan_body_left == 0)
				{
					scan_message_done();
					scan_hdr_have = 0;
				}
			}
		}
		else
		{
			size_t		n = Min(len, (size_t) scan_body_left);

			if (scan_capturing && scan_cap_len < scan_cap_max)
			{
				size_t		c = Min(n, (size_t) (scan_cap_max - scan_cap_len));

				memcpy(scan_cap + scan_cap_len, p, c);
				scan_cap_len += c;
			}
			p += n;
			len -= n;
			scan_body_left -= n;
			if (scan_body_left == 0)
			{
				scan_message_done();
				scan_hdr_have = 0;
			}
		}
	}
}

/* ------------------------------------------------------------------------
 * Dropping the unnamed prepared statement when another client arrives.
 *
 * A direct session's unnamed statement (protocol Parse with an empty name)
 * lives until the next Parse "", a Close of statement "", or a simple Query
 * (postgres.c exec_parse_message(), exec_close_message(),
 * exec_simple_query(): all call the static drop_unnamed_stmt()); DISCARD
 * ALL leaves it.  So when a backend switches to another client, the next
 * bytes the server reads on the client socket are a Close('S', "") that
 * nextgres hands it ahead of the client's own (through the same recv()
 * redirection as above), and the CloseComplete the server answers is
 * dropped on the way out (comm.rs putmessage), so the client sees neither.
 * The server drops the statement itself, exactly as for a client's Close.
 *
 * Why not reach the statement directly: unnamed_stmt_psrc is static in
 * postgres.c, with no exported symbol (only an unstripped build's symbol
 * table names it), and clearing it without DropCachedPlan() would leak the
 * plan source and its plan references; nothing exported drops it.  The
 * injected message costs no system call: the server reads it from memory,
 * then waits for the client's bytes as usual (the pooler attaches a client
 * when it sent something, so no extra wait).  A Close message starts no
 * transaction, sets no statement timestamp, is not logged, and the server
 * answers it with CloseComplete only (no ReadyForQuery: that comes after
 * Sync or a Query); the statement being gone, a later Bind/Describe "" of
 * the new client fails with 26000 as on a direct connection.  Reading it
 * stops the idle_session_timeout timer re-armed at attach (PostgresMain
 * turns it off after each message it reads) and, no ReadyForQuery
 * following a Close, nothing arms it again for the client's first
 * message: usually its bytes are already there, but a client that sends
 * 1-4 bytes and stalls holds the backend without idle_session_timeout,
 * where a direct session keeps the timer while it reads a message's first
 * bytes (README, "Not supported yet").  Where recv() cannot be redirected
 * (ng_lazy_statements_init() false), the unnamed statement survives the
 * switch as before (README; session.rs logs it once per backend).
 * ------------------------------------------------------------------------ */

/* Close: type, length 6, 'S' (statement), name "" (protocol message formats). */
static const unsigned char close_unnamed_msg[7] = {'C', 0, 0, 0, 6, 'S', '\0'};
static int	close_unnamed_sent = -1;	/* -1 none queued, else bytes given */

extern void ng_rs_injected_close_read(void);
bool		ng_lazy_statements_init(void);
bool		ng_patch_executable_got(const char *name, void *fn);
bool		ng_close_unnamed_before_client(void);

/*
 * Queues a Close of the unnamed statement ahead of the client's next bytes.
 * False when recv() could not be redirected (nothing queued).
 */
bool
ng_close_unnamed_before_client(void)
{
	if (!ng_lazy_statements_init())
		return false;
	close_unnamed_sent = 0;
	return true;
}

/* Hands out the queued Close (all or part of it) in place of a recv(). */
static ssize_t
give_close_unnamed(void *buf, size_t len)
{
	size_t		n = Min(len, sizeof(close_unnamed_msg) - (size_t) close_unnamed_sent);

	memcpy(buf, close_unnamed_msg + close_unnamed_sent, n);
	close_unnamed_sent += n;
	if (close_unnamed_sent == (int) sizeof(close_unnamed_msg))
	{
		close_unnamed_sent = -1;
		ng_rs_injected_close_read();	/* its CloseComplete is not the client's */
	}
	return (ssize_t) n;
}

/* ------------------------------------------------------------------------
 * Read-ahead of a kept client's next message.  A backend keeping its idle
 * client (kernel queue, hold_idle_clients) must know what the client sent
 * before the server reads it: a lone Terminate would end the backend
 * (PostgresMain exits on it) where the client only leaves the pool.  A
 * MSG_PEEK look followed by the server's own recv() was two system calls
 * per transaction where a direct backend makes one; instead the look reads
 * the bytes here, and the server's next recv() on the client socket gets
 * them from this buffer (ng_recv), in order, before anything more from the
 * socket.  recv() must be redirected for this (ng_lazy_statements_init).
 * ------------------------------------------------------------------------ */
static char read_ahead_buf[8192];	/* PQ_RECV_BUFFER_SIZE: one server read */
static size_t read_ahead_len = 0;
static size_t read_ahead_pos = 0;
static int	read_ahead_fd = -1;	/* the socket they came from */

ssize_t		ng_read_ahead(int fd, const char **bytes);
bool		ng_read_ahead_pending(void);
void		ng_read_ahead_clear(void);
void		ng_read_ahead_detach(void);
void		ng_read_ahead_forget(int fd);

/*
 * Reads what the client on `fd` has sent, without waiting, into the
 * read-ahead buffer; *bytes points at them.  The server gets them from its
 * next recv() on `fd` once `fd` is its client socket (MyProcPort->sock;
 * a client taken from the queue is read before it is attached).  Returns
 * the byte count, 0 at end of file, -1 with errno set (EAGAIN: nothing
 * yet), or -2 when nothing was read: recv() is not redirected, or bytes
 * read ahead are still pending (the caller looks with MSG_PEEK instead).
 */
ssize_t
ng_read_ahead(int fd, const char **bytes)
{
	ssize_t		n;

	*bytes = NULL;
	if (!ng_lazy_statements_init() || read_ahead_pos < read_ahead_len)
		return -2;
	n = real_recv(fd, read_ahead_buf, sizeof(read_ahead_buf), MSG_DONTWAIT);
	read_ahead_pos = 0;
	read_ahead_len = n > 0 ? (size_t) n : 0;
	read_ahead_fd = fd;
	*bytes = read_ahead_buf;
	return n;
}

/* Bytes read ahead from the server's client socket not read by it yet. */
bool
ng_read_ahead_pending(void)
{
	return read_ahead_pos < read_ahead_len && MyProcPort && read_ahead_fd == MyProcPort->sock;
}

/* Drops the bytes read ahead (a client that left with a Terminate). */
void
ng_read_ahead_clear(void)
{
	read_ahead_pos = read_ahead_len = 0;
	read_ahead_fd = -1;
}

/* The client on `fd` leaves this backend (closed here, or given back):
 * what was read ahead from it goes with it. */
void
ng_read_ahead_forget(int fd)
{
	if (read_ahead_fd == fd)
		ng_read_ahead_clear();
}

/* The client on the server's socket leaves this backend: what was read
 * ahead from it goes (none is left there: a backend reads ahead only to
 * serve the message).  Bytes of a client taken next stay. */
void
ng_read_ahead_detach(void)
{
	if (MyProcPort && read_ahead_fd == MyProcPort->sock)
		ng_read_ahead_clear();
}

/*
 * Is the pooled client that was idle at its last ReadyForQuery(I) (or its
 * attach) idle again, now that the server has read all it sent and waits for
 * more?  It sent something since (or had it buffered then), the server
 * answered none of it, and no message is half read: that is only messages
 * the server ignores or answers with nothing, CopyData, CopyDone and CopyFail
 * left from a COPY FROM STDIN that failed (postgres.c accepts and ignores
 * them outside COPY; psql, psycopg and asyncpg send the rest of the data and
 * its end after the error), or a Flush.  Nothing then gives the server a
 * flush after a ReadyForQuery, so without this the idle client kept its
 * backend until its next message, and the pool's other clients waited
 * (hunt11b 1).  Nothing started since could be a COPY: its CopyInResponse
 * is an answer (comm.rs).  Not while a CopyData is the client's last
 * message: the rest of a large COPY would be let go and attached again at
 * each read that drained the socket; its CopyDone or CopyFail lets it go.
 */
extern bool ng_rs_unanswered(void);
extern void ng_rs_injected_flush(void);

static bool
idle_input_read(void)
{
	return (idle_input || scan_since_attach > scan_at_ready) &&
		scan_hdr_have == 0 && scan_body_left == 0 && !scan_in_copy &&
		parse_count == 0 && !parse_lost && !IsTransactionOrTransactionBlock() &&
		ng_rs_unanswered();
}

/*
 * Is the server inside a message read (pqcomm.c pq_startmsgread() ..
 * pq_endmsgread())?  A flush there (an interrupt's, a FATAL's) does not
 * answer the client's Flush: comm.rs waits for the one that does.
 */
bool		ng_reading_message(void);
bool
ng_reading_message(void)
{
	return pq_is_reading_msg();
}

/*
 * In place of a recv() that would wait, when idle_input_read(): a Flush of
 * our own, which the server reads as the client's and answers with a flush
 * (nothing to send), where comm.rs finds the client's boundary.  Once per
 * input read: what came before it no longer counts.
 */
static ssize_t
give_idle_flush(void *buf)
{
	static const unsigned char flush_msg[5] = {'H', 0, 0, 0, 4};

	memcpy(buf, flush_msg, sizeof(flush_msg));
	scan_at_ready = scan_since_attach;
	idle_input = false;
	ng_rs_injected_flush();
	return (ssize_t) sizeof(flush_msg);
}

/* Installed in place of the executable's recv(). */
static ssize_t
ng_recv(int fd, void *buf, size_t len, int flags)
{
	ssize_t		n;

	if (close_unnamed_sent >= 0 && len > 0 && !(flags & MSG_PEEK) &&
		MyProcPort && fd == MyProcPort->sock)
		return give_close_unnamed(buf, len);
	if (read_ahead_pos < read_ahead_len && len > 0 && fd == read_ahead_fd && MyProcPort && fd == MyProcPort->sock)
	{
		n = (ssize_t) Min(len, read_ahead_len - read_ahead_pos);
		memcpy(buf, read_ahead_buf + read_ahead_pos, n);
		if (flags & MSG_PEEK)
			return n;
		read_ahead_pos += n;
	}
	else
	{
		n = real_recv(fd, buf, len, flags);
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && len >= 5 &&
			!(flags & MSG_PEEK) && MyProcPort && fd == MyProcPort->sock &&
			idle_input_read())
			return give_idle_flush(buf);
	}

	if (n > 0 && !(flags & MSG_PEEK) && MyProcPort && fd == MyProcPort->sock)
		scan_bytes((const unsigned char *) buf, (size_t) n);
	return n;
}

/* A libc function of the main executable to redirect (ng_patch_executable_got). */
typedef struct GotPatch
{
	const char *name;
	void	   *fn;
	bool		done;
} GotPatch;

/* Finds the main executable's GOT slot for p->name and points it at p->fn. */
static int
patch_got(struct dl_phdr_info *info, size_t size, void *data)
{
	GotPatch   *p = (GotPatch *) data;
	ElfW(Dyn) * dyn = NULL;
	ElfW(Sym) * symtab = NULL;
	const char *strtab = NULL;
	ElfW(Rela) * rels[2] = {NULL, NULL};
	size_t		relsz[2] = {0, 0};
	uintptr_t	relro_lo = 0,
				relro_hi = 0;
	long		page = sysconf(_SC_PAGESIZE);

	(void) size;
	for (int i = 0; i < info->dlpi_phnum; i++)
	{
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];

		if (ph->p_type == PT_DYNAMIC)
			dyn = (ElfW(Dyn) *) (info->dlpi_addr + ph->p_vaddr);
		else if (ph->p_type == PT_GNU_RELRO)
		{
			relro_lo = info->dlpi_addr + ph->p_vaddr;
			relro_hi = relro_lo + ph->p_memsz;
		}
	}
	if (dyn == NULL)
		return 1;
	/* ld.so relocates these in place for most objects; not always. */
#define DYNPTR(v) ((uintptr_t) (v) < info->dlpi_addr ? info->dlpi_addr + (uintptr_t) (v) : (uintptr_t) (v))
	for (ElfW(Dyn) * d = dyn; d->d_tag != DT_NULL; d++)
	{
		switch (d->d_tag)
		{
			case DT_SYMTAB:
				symtab = (ElfW(Sym) *) DYNPTR(d->d_un.d_ptr);
				break;
			case DT_STRTAB:
				strtab = (const char *) DYNPTR(d->d_un.d_ptr);
				break;
			case DT_JMPREL:
				rels[0] = (ElfW(Rela) *) DYNPTR(d->d_un.d_ptr);
				break;
			case DT_PLTRELSZ:
				relsz[0] = d->d_un.d_val;
				break;
			case DT_RELA:
				rels[1] = (ElfW(Rela) *) DYNPTR(d->d_un.d_ptr);
				break;
			case DT_RELASZ:
				relsz[1] = d->d_un.d_val;
				break;
		}
	}
#undef DYNPTR
	if (symtab == NULL || strtab == NULL)
		return 1;
	for (int k = 0; k < 2; k++)
	{
		for (size_t j = 0; rels[k] && j < relsz[k] / sizeof(ElfW(Rela)); j++)
		{
			ElfW(Rela) *r = &rels[k][j];
			size_t		sym = ELF64_R_SYM(r->r_info);	/* 64-bit targets only */
			void	  **slot;
			uintptr_t	pg;

			if (sym == 0 || strcmp(strtab + symtab[sym].st_name, p->name) != 0)
				continue;
			slot = (void **) (info->dlpi_addr + r->r_offset);
			pg = (uintptr_t) slot & ~((uintptr_t) page - 1);
			if (mprotect((void *) pg, page, PROT_READ | PROT_WRITE) != 0)
				return 1;
			*slot = p->fn;
			if ((uintptr_t) slot >= relro_lo && (uintptr_t) slot < relro_hi)
				(void) mprotect((void *) pg, page, PROT_READ);
			p->done = true;
		}
	}
	return 1;					/* the first object is the executable */
}

/*
 * Once per backend, before its first client switch: true when statements
 * can be created lazily.
 */
bool
ng_lazy_statements_init(void)
{
	static int	state = 0;		/* 0 unknown, 1 yes, -1 no */

	if (state != 0)
		return state > 0;
	state = -1;
	real_recv = (recv_fn) dlsym(RTLD_DEFAULT, "recv");
	if (real_recv != NULL && ng_patch_executable_got("recv", (void *) ng_recv))
		state = 1;
	return state > 0;
}

/*
 * Points the main executable's calls of the libc function `name` at `fn`
 * (its GOT slot; this backend only, after fork).  False when not found
 * (then nothing changed).  Elf64 relocations only.
 */
bool
ng_patch_executable_got(const char *name, void *fn)
{
	GotPatch	p = {name, fn, false};

#if __ELF_NATIVE_CLASS != 64
	return false;
#endif
	dl_iterate_phdr(patch_got, &p);
	return p.done;
}

/*
 * Creates one of the client's prepared statements under its own name, as
 * the server's plan cache holds a statement whose objects changed since it
 * was prepared: raw parse tree, parameter types fixed at the client's
 * Parse/PREPARE, the result description the client saw then, and not
 * valid.  The first use re-analyzes it exactly as the server revalidates a
 * statement on a direct connection (plancache.c RevalidateCachedQuery): a
 * missing table fails with the analysis error and works again once it is
 * back, changed result columns fail with 0A000 "cached plan must not change
 * result type".  No catalog access, so it can run at any point between two
 * client messages, in or out of a transaction, aborted or not.
 *
 * Statements without real parse analysis (transaction control, SET, ...:
 * analyze.c stmt_requires_parse_analysis()) are never revalidated, so those
 * are completed here; their analysis reads no catalog (but SHOW's, below).
 *
 * The text is lexed as it was at the client's Parse/PREPARE
 * (standard_conforming_strings then: `backslash_escapes`), quietly: its
 * literals mean what they meant there, and the lexer's notices, which the
 * client had then, are not sent again.  The analysis at first use runs under
 * the settings the client's last analysis of it ran under (`analysis`:
 * `nanalysis` name\0value\0 pairs, see analysis_gucs), so its literals get
 * the values they got then; any later one under the settings of its moment,
 * as the server's own revalidation does after an invalidation.
 *
 * On failure (a raw parse that no longer succeeds) the statement is not
 * created and the error is returned.
 */
bool
ng_create_statement(const char *name, const char *text, bool from_sql,
					bool backslash_escapes,
					int nparams, const Oid *params, const char *result, int rlen,
					const char *analysis, int nanalysis, bool invalidated, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	MemoryContext tmp = AllocSetContextCreate(TopMemoryContext, "nextgres statement",
											  ALLOCSET_SMALL_SIZES);
	volatile bool ok = true;
	volatile bool started = false;

	creating_statement++;
	PG_TRY();
	{
		List	   *raw;
		RawStmt    *rs;
		CachedPlanSource *psrc;
		Oid		   *types = NULL;

		MemoryContextSwitchTo(tmp);
		raw = quiet_raw_parse(text, backslash_escapes);
		if (nparams > 0)
		{
			types = palloc(sizeof(Oid) * nparams);
			memcpy(types, params, sizeof(Oid) * nparams);
		}
		if (raw == NIL && !from_sql)
		{
			/*
			 * Empty text (or only comments): legal at Parse, a statement
			 * without a parse tree whose portal answers EmptyQueryResponse,
			 * created as postgres.c exec_parse_message() creates it.
			 */
			psrc = CreateCachedPlan(NULL, text, CMDTAG_UNKNOWN);
			CompleteCachedPlan(psrc, NIL, NULL, types, nparams, NULL, NULL,
							   CURSOR_OPT_PARALLEL_OK, true);
			goto store;
		}
		if (list_length(raw) != 1)
			elog(ERROR, "prepared statement text is not one statement");
		rs = linitial_node(RawStmt, raw);
		if (from_sql)
		{
			/* As PrepareQuery() (prepare.c) stores the PREPARE's query. */
			RawStmt    *inner = makeNode(RawStmt);

			if (!IsA(rs->stmt, PrepareStmt))
				elog(ERROR, "prepared statement text is not PREPARE");
			inner->stmt = ((PrepareStmt *) rs->stmt)->query;
			inner->stmt_location = rs->stmt_location;
			inner->stmt_len = rs->stmt_len;
			rs = inner;
		}
		psrc = CreateCachedPlan(rs, text, CreateCommandTag(rs->stmt));
		if (!stmt_requires_parse_analysis(rs))
		{
			List	   *qt;

			/*
			 * SHOW's result column comes from the setting's definition, and
			 * for a setting only some roles may see, after a privilege
			 * check that reads the catalogs (guc.c GetConfigOptionByName):
			 * outside any transaction that has no resource owner and
			 * crashes, so it gets one of its own.
			 */
			if (IsA(rs->stmt, VariableShowStmt) && !IsTransactionOrTransactionBlock())
			{
				StartTransactionCommand();
				started = true;
				MemoryContextSwitchTo(tmp);
			}
			qt = pg_analyze_and_rewrite_fixedparams(rs, text, types, nparams, NULL);
			CompleteCachedPlan(psrc, qt, NULL, types, nparams, NULL, NULL,
							   CURSOR_OPT_PARALLEL_OK, true);
			/*
			 * The result the client was told at its Parse/PREPARE, which
			 * such a statement keeps for its life (it is never revalidated):
			 * computed now, EXECUTE of an SQL statement not created here yet,
			 * or FETCH from a cursor that does not exist here, would say no
			 * rows.
			 */
			MemoryContextSwitchTo(psrc->context);
			if (psrc->resultDesc)
				FreeTupleDesc(psrc->resultDesc);
			psrc->resultDesc = result_desc(result, rlen);
			if (started)
			{
				CommitTransactionCommand();
				started = false;
				MemoryContextSwitchTo(tmp);
			}
		}
		else
		{
			/* What CompleteCachedPlan() sets, minus the analyzed query. */
			MemoryContextSwitchTo(psrc->context);
			if (nparams > 0)
			{
				psrc->param_types = palloc(sizeof(Oid) * nparams);
				memcpy(psrc->param_types, params, sizeof(Oid) * nparams);
			}
			psrc->num_params = nparams;
			psrc->cursor_options = CURSOR_OPT_PARALLEL_OK;
			psrc->fixed_result = true;
			psrc->resultDesc = result_desc(result, rlen);
			psrc->is_complete = true;
			psrc->is_valid = false;
			/* Its first analysis runs under the settings the client's did. */
			{
				NgAnalysis *a = palloc0(sizeof(NgAnalysis));

				a->src = psrc;
				/* Invalidated there: analyzed under the settings of its moment. */
				a->pending = !invalidated;
				a->invalid_written = invalidated;
				analysis_read(a, analysis, nanalysis);
				psrc->parserSetup = ng_parser_setup;
				psrc->parserSetupArg = a;
				analysis_track(a);
			}
		}
store:
		MemoryContextSwitchTo(tmp);
		StorePreparedStatement(name, psrc, from_sql);
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		if (started)
			AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	creating_statement--;
	MemoryContextSwitchTo(cxt);
	/* A stored statement's context now hangs off CacheMemoryContext. */
	MemoryContextDelete(tmp);
	return ok;
}

/*
 * Drops the named prepared statement `name`, as DEALLOCATE does
 * (DropPreparedStatement, commands/prepare.c); a missing one is no error.
 * Between two clients, outside any transaction: dropping a statement only
 * releases its cached plans (DropCachedPlan, utils/cache/plancache.c), which
 * needs no transaction or resource owner.
 */
bool
ng_drop_statement(const char *name, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		DropPreparedStatement(name, false);
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return ok;
}

/* The client has statements not created here yet (Rust keeps them). */
void
ng_set_statements_pending(bool pending)
{
	/* The scan keeps its place: it restarts only at an attach. */
	statements_pending = pending;
}

bool
ng_switch_end(NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	/* Restoring is not the client's doing: nothing to report at release. */
	settings_dirty = statements_dirty = false;
	return ok;
}

/* ------------------------------------------------------------------------
 * Checking a client's startup settings in the pooler.
 * ------------------------------------------------------------------------ */

static struct config_generic *
lookup_guc(const char *name)
{
	int			n;
	struct config_generic **vars = guc_array(&n);
	struct config_generic *found = NULL;

	for (int i = 0; i < n && !found; i++)
		if (pg_strcasecmp(vars[i]->name, name) == 0)
			found = vars[i];
#if PG_VERSION_NUM >= 160000
	pfree(vars);
#endif
	return found;
}

/*
 * A startup session_authorization the login may not take is refused by the
 * server from the minor releases that moved its permission check into
 * check_session_authorization() (the fix of CVE-2024-10978: 17.1, 16.5,
 * 15.9); before them it is accepted at startup (16.2 does).  Decided by the
 * headers the extension is built with, which are the server's own release.
 */
#define SESSION_AUTHORIZATION_CHECKED_AT_STARTUP \
	(PG_VERSION_NUM >= 170001 || \
	 (PG_VERSION_NUM >= 160005 && PG_VERSION_NUM < 170000) || \
	 (PG_VERSION_NUM >= 150009 && PG_VERSION_NUM < 160000))

/*
 * The permission checks of the identity settings given at startup, for the
 * client's login role `login`: the server makes them against the session's
 * own user (variable.c check_role, check_session_authorization), which in
 * the pooler's agent is not the client.  A role that does not exist is left
 * to the setting's own check, which reports it as the server does.
 */
static void
check_identity_setting(const char *name, const char *value, Oid login, bool superuser)
{
	Oid			target;

	if (pg_strcasecmp(name, "role") == 0)
	{
		if (strcmp(value, "none") == 0 || !OidIsValid(target = get_role_oid(value, true)))
			return;
#if PG_VERSION_NUM >= 160000
		if (!member_can_set_role(login, target))
#else
		if (!is_member_of_role(login, target))
#endif
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to set role \"%s\"", value)));
	}
	else if (pg_strcasecmp(name, "session_authorization") == 0 && SESSION_AUTHORIZATION_CHECKED_AT_STARTUP)
	{
		if (superuser || !OidIsValid(target = get_role_oid(value, true)) || target == login)
			return;
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to set session authorization \"%s\"", value)));
	}
}

/*
 * Runs fn(arg) in a transaction that is then rolled back whatever fn did
 * (AbortTransaction runs AtEOXact_GUC: settings fn applied come undone), the
 * server's ERROR, if fn raised one, captured into err (false then).  The
 * agent's checks of settings.
 */
static bool
ng_rolled_back(void (*fn) (void *), void *arg, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		StartTransactionCommand();
		fn(arg);
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		ok = false;
	}
	PG_END_TRY();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(cxt);
	return ok;
}

typedef struct NgValidate
{
	const char *name;
	const char *value;
	bool		superuser;
	Oid			role;
	char	   *shown;
	int			shown_len;
} NgValidate;

static void
ng_validate_in_xact(void *arg)
{
	NgValidate *a = (NgValidate *) arg;
	const char *name = a->name;
	const char *value = a->value;
	struct config_generic *g;
	GucContext	ctx = a->superuser ? PGC_SU_BACKEND : PGC_BACKEND;
	bool		report;

	g = lookup_guc(name);

	/*
	 * Superuser-only settings: the server would consult GRANT SET ON
	 * PARAMETER (pg_parameter_acl), which a process attached to no database
	 * cannot read (opening it is FATAL).  Refuse as the server does for roles
	 * without the grant; a granted role can still SET it in its session,
	 * where its backend checks the grant.
	 */
	if (g && !a->superuser && (g->context == PGC_SUSET || g->context == PGC_SU_BACKEND))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to set parameter \"%s\"", name)));
	check_identity_setting(name, value, a->role, a->superuser);

	/*
	 * Libraries a session loads at its start: a pooled backend serves one
	 * client after another and a library cannot be unloaded, so one
	 * client's cannot be loaded for it (and must not stay for the next).
	 * Refused rather than accepted and never loaded, which the client could
	 * not tell (the server would load it, or refuse a missing one).
	 */
	if (g && (pg_strcasecmp(g->name, "local_preload_libraries") == 0 ||
			  pg_strcasecmp(g->name, "session_preload_libraries") == 0) &&
		strspn(value, " \t\n\r\f\v") != strlen(value))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("nextgres: a pooled session cannot load libraries at its start (\"%s\")", g->name),
				 errhint("Load them for all sessions of the role or database (ALTER ROLE ... SET %s), or connect to the server's own socket.",
						 g->name)));

	/*
	 * As in the server's InitPostgres() up to 17, which applies startup
	 * settings in its first transaction, read committed and with a snapshot
	 * taken: so transaction_isolation (but read committed) and
	 * transaction_deferrable are refused with its 25001 "... must be called
	 * before any query" (variable.c check hooks test FirstSnapshotSet).
	 * Both are undone by the rollback.  18's InitPostgres() takes no
	 * snapshot there, and accepts them.  Only for the transaction_*
	 * settings, whose check hooks are the ones that look: a snapshot (a
	 * scan of the proc array) per setting of every login is not free.
	 */
#if PG_VERSION_NUM < 180000
	if (g && pg_strncasecmp(g->name, "transaction_", 12) == 0)
	{
		XactIsoLevel = XACT_READ_COMMITTED;
		(void) GetTransactionSnapshot();
	}
#endif
	report = g && (g->flags & GUC_REPORT) && a->shown_len > 0 &&
		pg_strcasecmp(g->name, "role") != 0 &&
		pg_strcasecmp(g->name, "session_authorization") != 0;

	/*
	 * Checked as a startup setting (source client), changing nothing: a value
	 * set with a source up to PGC_S_OVERRIDE also becomes the reset value and
	 * the prior value of every GUC stack entry (guc.c set_config_option's
	 * makeDefault), which no rollback undoes, so it would stay this process's
	 * value for ever after (-1: valid, not applied).  A reported setting is
	 * then applied as a session's SET would be, which the rollback does undo,
	 * only to read the value the server shows.
	 */
	if (set_config_option(name, value, ctx, PGC_S_CLIENT, GUC_ACTION_SET,
						  false, ERROR, false) != 0 && report &&
		set_config_option(name, value, ctx, PGC_S_SESSION, GUC_ACTION_SET,
						  true, ERROR, false) > 0)
	{
		/* As ReportGUCOption() shows it (the show hook: TimeZone). */
		const char *v = GetConfigOptionByName(g->name, NULL, false);

		if (v && (int) strlen(v) < a->shown_len)
			strlcpy(a->shown, v, a->shown_len);
	}
}

/*
 * Checks a startup setting as the server applies it at connection start
 * (context backend or superuser-backend, source client) without applying it,
 * so the client gets the same SQLSTATE, message, detail and hint as a direct
 * connection's FATAL.  `role`: the client's login role (oid).
 *
 * A setting the server reports (GUC_REPORT: DateStyle, TimeZone,
 * client_encoding, ...) is also applied, inside the check's transaction,
 * which is then rolled back (guc.c AtEOXact_GUC puts the value back), to
 * read the value the server shows for it ("ISO, DMY" for iso,dmy): copied
 * to `shown` (`shown_len` bytes with the NUL; empty when it does not fit or
 * for the identity settings, which are not applied here).
 */
bool
ng_validate_setting(const char *name, const char *value, bool superuser, Oid role,
					char *shown, int shown_len, NgError *err)
{
	NgValidate	a = {name, value, superuser, role, shown, shown_len};

	if (shown_len > 0)
		shown[0] = '\0';
	return ng_rolled_back(ng_validate_in_xact, &a, err);
}

typedef struct NgLoginParams
{
	Oid			role;
	const char *names;
	int			n;
	const char *settings;
	int			nsettings;
	char	   *out;
	int			out_len;
	int		   *used;
} NgLoginParams;

/* The role and database settings, quietly (see ng_login_params). */
static void
ng_apply_login_settings(const char *item, int nsettings)
{
	int			save_log = log_min_messages;
	int			save_client = client_min_messages;

	log_min_messages = ERROR;
	client_min_messages = ERROR;
	PG_TRY();
	{
		/* A local of this block: `item` itself stays as setjmp saw it. */
		const char *p = item;

		for (int i = 0; i < nsettings; i++)
		{
			const char *setting = p;
			const char *value = setting + strlen(setting) + 1;

			(void) set_config_option(setting, value, PGC_SUSET, PGC_S_SESSION,
									 GUC_ACTION_SET, true, WARNING, false);
			p = value + strlen(value) + 1;
		}
	}
	PG_FINALLY();
	{
		log_min_messages = save_log;
		client_min_messages = save_client;
	}
	PG_END_TRY();
}

static void
ng_login_params_in_xact(void *arg)
{
	NgLoginParams *a = (NgLoginParams *) arg;
	const char *name = a->names;
	int			pos = 0;

	ng_apply_login_settings(a->settings, a->nsettings);
	for (int i = 0; i < a->n; i++)
	{
		const char *v;
		int			len;

		if (pg_strcasecmp(name, "is_superuser") == 0)
		{
			/*
			 * A role setting (a role default, the client's startup role)
			 * applied above makes is_superuser that role's, as assign_role()
			 * sets it at a login.
			 */
			Oid			current = GetCurrentRoleId();

			v = superuser_arg(OidIsValid(current) ? current : a->role) ? "on" : "off";
		}
		else if (pg_strcasecmp(name, "session_authorization") == 0)
			v = GetUserNameFromId(a->role, true);
		else
			v = GetConfigOptionByName(name, NULL, true);
		if (v == NULL)
			v = "";
		len = strlen(v) + 1;
		if (pos + len > a->out_len)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("login parameter values exceed %d bytes", a->out_len)));
		memcpy(a->out + pos, v, len);
		pos += len;
		name += strlen(name) + 1;
	}
	*a->used = pos;
}

/*
 * The values a fresh login of role `role` would report now in its
 * ParameterStatus messages, for the `n` setting names in `names` (each
 * NUL-terminated, one after the other), written to `out` the same way
 * (`*used` bytes).  The pooler answers a client's login with these: a
 * pool's first backend logged in before an ALTER ROLE/DATABASE ... SET, a
 * reloaded postgresql.conf, a promotion or an ALTER ROLE ... NOSUPERUSER
 * reports values a login now would not get.
 *
 * `settings`: the `nsettings` pg_db_role_setting items that apply to the
 * login (the pooler's copy: the agent belongs to no database and cannot
 * open that catalog), each the name, NUL, the value, NUL, from the lowest
 * level (all databases and roles) to the highest (that database and role).
 * Applied over this process's postgresql.conf values, each over the ones
 * before, which gives what postinit.c process_settings() gives a login (it
 * goes highest first and lets none override a higher one), with context
 * superuser as ProcessGUCArray; as a session's SET (source session), inside
 * a transaction that is then rolled back (AbortTransaction runs
 * AtEOXact_GUC: the agent's own values come back; a source up to
 * PGC_S_OVERRIDE would change them for good, see ng_validate_setting).
 * Warnings for bad stored values, which the login's backend logs, are not
 * logged twice.
 * is_superuser is the role's (that of a role setting among `settings`, as
 * assign_role() makes it), session_authorization the login role's, as the login's
 * SetSessionAuthorization() sets them; in_hot_standby's show hook reads
 * the server's state now.  A name no setting has gets an empty value.
 */
bool
ng_login_params(Oid role, const char *names, int n, const char *settings, int nsettings,
				char *out, int out_len, int *used, NgError *err)
{
	NgLoginParams a = {role, names, n, settings, nsettings, out, out_len, used};

	*used = 0;
	return ng_rolled_back(ng_login_params_in_xact, &a, err);
}

/* ------------------------------------------------------------------------
 * The server's session statistics.
 * ------------------------------------------------------------------------ */

/*
 * pg_stat_database.sessions counts client sessions, as for direct ones
 * (pgstat_database.c pgstat_report_connect() counts a backend's login):
 * +1 when a client's session starts on a pooled backend, -1 once for the
 * pooled backend's own login, which is no client's.  Flushed at once, as a
 * direct session's count is by the time it can run a query.
 */
void
ng_count_session(int delta)
{
	MemoryContext cxt = CurrentMemoryContext;

	if (!OidIsValid(MyDatabaseId))
		return;
	PG_TRY();
	{
		DB_SESSIONS(pgstat_prep_database_pending(MyDatabaseId)) += delta;
		(void) pgstat_report_stat(true);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
}

/* ------------------------------------------------------------------------
 * Role and database defaults (pg_db_role_setting) of each client's login.
 * ------------------------------------------------------------------------ */

/* Levels, lowest precedence first, as the server's sources for them. */
static const GucSource default_sources[4] = {
	PGC_S_GLOBAL, PGC_S_DATABASE, PGC_S_USER, PGC_S_DATABASE_USER
};

/*
 * The defaults in force now for this backend's database and session user
 * (the client's role), as "<level>name\0value\0" pairs, lowest precedence
 * first: the rows postinit.c process_settings() applies at a login (it goes
 * highest first and lets none override a higher one; the same result).
 * NULL on error.
 */
char *
ng_read_defaults(int *len)
{
	MemoryContext cxt = CurrentMemoryContext;
	StringInfoData out;
	volatile bool ok = true;

	initStringInfo(&out);
	PG_TRY();
	{
		Relation	rel;

		StartTransactionCommand();
		rel = table_open(DbRoleSettingRelationId, AccessShareLock);
		for (int level = 0; level < 4; level++)
		{
			Oid			db = (level == 1 || level == 3) ? MyDatabaseId : InvalidOid;
			Oid			role = level >= 2 ? GetSessionUserId() : InvalidOid;
			ScanKeyData keys[2];
			SysScanDesc scan;
			HeapTuple	tup;

			ScanKeyInit(&keys[0], Anum_pg_db_role_setting_setdatabase, BTEqualStrategyNumber,
						F_OIDEQ, ObjectIdGetDatum(db));
			ScanKeyInit(&keys[1], Anum_pg_db_role_setting_setrole, BTEqualStrategyNumber,
						F_OIDEQ, ObjectIdGetDatum(role));
			scan = systable_beginscan(rel, DbRoleSettingDatidRolidIndexId, true, NULL, 2, keys);
			while (HeapTupleIsValid(tup = systable_getnext(scan)))
			{
				bool		isnull;
				Datum		d = heap_getattr(tup, Anum_pg_db_role_setting_setconfig,
											 RelationGetDescr(rel), &isnull);
				Datum	   *elems;
				bool	   *nulls;
				int			n;

				if (isnull)
					continue;
				deconstruct_array_builtin(DatumGetArrayTypeP(d), TEXTOID, &elems, &nulls, &n);
				for (int i = 0; i < n; i++)
				{
					char	   *name,
							   *value;

					if (nulls[i])
						continue;
					ParseLongOption(TextDatumGetCString(elems[i]), &name, &value);
					if (value == NULL)
						continue;
					appendStringInfoChar(&out, (char) ('0' + level));
					put_str(&out, name);
					put_str(&out, value);
				}
			}
			systable_endscan(scan);
		}
		table_close(rel, AccessShareLock);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	if (!ok)
	{
		pfree(out.data);
		return NULL;
	}
	*len = out.len;
	return out.data;
}

/*
 * A setting's reset value as text, as GetConfigOptionResetString() gives it
 * but without its visibility check: for a setting only superusers may see
 * (a role default of session_preload_libraries for auto_explain, say) that
 * check looks the current role up in the catalogs, which here, outside any
 * transaction, crashes the backend (no resource owner).  The caller reads
 * the defaults of the client's own login, which the server applied for it.
 */
static const char *
reset_string(struct config_generic *g)
{
	static char buffer[64];

	switch (g->vartype)
	{
		case PGC_BOOL:
			return ((struct config_bool *) g)->reset_val ? "on" : "off";
		case PGC_INT:
			snprintf(buffer, sizeof(buffer), "%d", ((struct config_int *) g)->reset_val);
			return buffer;
		case PGC_REAL:
			snprintf(buffer, sizeof(buffer), "%g", ((struct config_real *) g)->reset_val);
			return buffer;
		case PGC_STRING:
			return ((struct config_string *) g)->reset_val;
		case PGC_ENUM:
			return config_enum_lookup_by_value((struct config_enum *) g,
											   ((struct config_enum *) g)->reset_val);
	}
	return NULL;
}

/*
 * The defaults this backend applied at its own login, in the same format:
 * every setting whose reset value came from one of those levels.
 */
char *
ng_applied_defaults(int *len)
{
	struct config_generic **vars;
	int			n;
	StringInfoData out;

	initStringInfo(&out);
	vars = guc_array(&n);
	for (int level = 0; level < 4; level++)
	{
		for (int i = 0; i < n; i++)
		{
			const char *v;

			if (vars[i]->reset_source != default_sources[level])
				continue;
			v = reset_string(vars[i]);
			appendStringInfoChar(&out, (char) ('0' + level));
			put_str(&out, vars[i]->name);
			put_str(&out, v ? v : "");
		}
	}
#if PG_VERSION_NUM >= 160000
	pfree(vars);
#endif
	*len = out.len;
	return out.data;
}

/*
 * The backend-start settings (PGC_BACKEND, PGC_SU_BACKEND: ignore_system_indexes,
 * post_auth_delay, log_connections, jit_debugging_support, ...) as this
 * backend's own login left them, read before its first client's startup
 * settings were applied: a client may send one in its startup packet, and
 * neither RESET nor DISCARD ALL can put it back (its reset value becomes the
 * client's), nor a reload (guc.c ignores those settings' new values in a
 * running backend), so ng_defaults_clear() restores them from here.
 */
typedef struct StartValue
{
	struct config_generic *g;
	char	   *value;
	GucSource	source;
} StartValue;

static StartValue *start_values = NULL;
static int	n_start_values = -1;

static void
note_start_values(void)
{
	int			n;
	struct config_generic **vars;

	if (n_start_values >= 0)
		return;
	vars = guc_array(&n);
	start_values = MemoryContextAlloc(TopMemoryContext, sizeof(StartValue) * Max(n, 1));
	n_start_values = 0;
	for (int i = 0; i < n; i++)
	{
		struct config_generic *g = vars[i];
		const char *v;

		if (g->context != PGC_BACKEND && g->context != PGC_SU_BACKEND)
			continue;
		v = GetConfigOption(g->name, true, false);
		start_values[n_start_values].g = g;
		start_values[n_start_values].value = MemoryContextStrdup(TopMemoryContext, v ? v : "");
		start_values[n_start_values].source = g->source;
		n_start_values++;
	}
#if PG_VERSION_NUM >= 160000
	pfree(vars);
#endif
}

static StartValue *
start_value_of(struct config_generic *g)
{
	for (int i = 0; i < n_start_values; i++)
		if (start_values[i].g == g)
			return &start_values[i];
	return NULL;
}

/*
 * Lowers a setting's source to PGC_S_DEFAULT as guc.c's set_guc_source()
 * does.  From 16 every setting whose source is not PGC_S_DEFAULT is on
 * guc.c's guc_nondef_list (the list RESET ALL / DISCARD ALL walks): the
 * setting must leave that list too, or the next set_config_option() with a
 * real source links it in a second time and the list becomes a cycle
 * (ResetAllOptions() then never returns).  dlist_delete() needs only the
 * node.  15 scans every setting and has no such list.
 */
static void
guc_source_to_default(struct config_generic *g)
{
	if (g->source == PGC_S_DEFAULT)
		return;
#if PG_VERSION_NUM >= 160000
	dlist_delete(&g->nondef_link);
#endif
	g->source = PGC_S_DEFAULT;
}

/*
 * Puts a setting back to what it is without role, database or client
 * defaults (its built-in default, then postgresql.conf's value once
 * ng_defaults_reload() runs), so other defaults can be applied with their
 * own sources.  Only between clients, right after DISCARD ALL.
 */
void
ng_defaults_clear(const char *name)
{
	MemoryContext cxt = CurrentMemoryContext;
	struct config_generic *g = lookup_guc(name);

	if (g == NULL)
		return;
	/* set_config_option() never lets a lower source override a higher one. */
	/* Postmaster command-line values (-c, PGC_S_ARGV) stay as they are. */
	if (g->source > PGC_S_ARGV && g->source <= PGC_S_CLIENT)
		guc_source_to_default(g);
	if (g->reset_source > PGC_S_ARGV && g->reset_source <= PGC_S_CLIENT)
		g->reset_source = PGC_S_DEFAULT;
	PG_TRY();
	{
		StartValue *sv = start_value_of(g);

		if (sv != NULL)
		{
			/*
			 * A backend-start setting: its login value and source, in the
			 * context a connection's start sets it in (the only one guc.c
			 * accepts for it; a superuser's SUSET would be refused).
			 */
			(void) set_config_option(g->name, sv->source == PGC_S_DEFAULT ? NULL : sv->value,
									 PGC_SU_BACKEND, sv->source,
									 GUC_ACTION_SET, true, WARNING, false);
		}
		else
			(void) set_config_option(g->name, NULL, PGC_SUSET, PGC_S_DEFAULT,
									 GUC_ACTION_SET, true, WARNING, false);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
}

/* Re-reads postgresql.conf (as at SIGHUP) after ng_defaults_clear(). */
void
ng_defaults_reload(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		ProcessConfigFile(PGC_SIGHUP);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
}

/* One default at its level, as process_settings() applies it at a login. */
void
ng_defaults_apply(int level, const char *name, const char *value)
{
	MemoryContext cxt = CurrentMemoryContext;

	if (level < 0 || level > 3)
		return;
	PG_TRY();
	{
		/*
		 * PGC_SUSET as the server applies pg_db_role_setting at a login
		 * (guc.c ProcessGUCArray from ApplySetting): ALTER ROLE/DATABASE SET
		 * of a superuser-only parameter was already checked when it was set.
		 */
		(void) set_config_option(name, value, PGC_SUSET,
								 default_sources[level], GUC_ACTION_SET, true, WARNING, false);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
}

/* ------------------------------------------------------------------------
 * The server's connection log lines for pooled clients (in the pooler).
 * ------------------------------------------------------------------------ */

#define NG_LOG_RECEIPT			1
#define NG_LOG_AUTHENTICATION	2
#define NG_LOG_AUTHORIZATION	4
#define NG_LOG_DISCONNECTION	8

/* Which of log_connections' lines and log_disconnections are on. */
int
ng_connection_logging(void)
{
	int			f = 0;

#if PG_VERSION_NUM >= 180000
	if (log_connections & LOG_CONNECTION_RECEIPT)
		f |= NG_LOG_RECEIPT;
	if (log_connections & LOG_CONNECTION_AUTHENTICATION)
		f |= NG_LOG_AUTHENTICATION;
	if (log_connections & LOG_CONNECTION_AUTHORIZATION)
		f |= NG_LOG_AUTHORIZATION;
#else
	if (Log_connections)
		f |= NG_LOG_RECEIPT | NG_LOG_AUTHENTICATION | NG_LOG_AUTHORIZATION;
#endif
	{
		/* Not in every version's headers; the setting is. */
		const char *v = GetConfigOption("log_disconnections", true, false);

		if (v && strcmp(v, "on") == 0)
			f |= NG_LOG_DISCONNECTION;
	}
	return f;
}

/*
 * log_connections and log_disconnections are PGC_SU_BACKEND: a reload
 * (ProcessConfigFile(PGC_SIGHUP)) changes them in the postmaster, whence new
 * backends inherit them, and in no process already under the postmaster
 * (guc.c set_config_option(): "ignore it in existing backends").  The
 * pooler writes those lines for the clients it logs in, as a new backend
 * would, so after each reload it takes the files' values as the postmaster
 * does (guc-file.l ProcessConfigFileInternal()): postgresql.conf with its
 * includes, then postgresql.auto.conf, the last entry winning; a value from
 * a higher source (the server's command line) stays; one no longer in the
 * files goes back to the built-in default; nothing changes when a file does
 * not parse or names an unknown setting (the postmaster then applies
 * nothing either), nor for a value the setting's own check refuses (the
 * postmaster logged why).  Called in the agent and in the pooler after their
 * ProcessConfigFile().
 */
void
ng_reload_connection_logging(void)
{
	static const char *const names[] = {"log_connections", "log_disconnections"};
#if PG_VERSION_NUM >= 180000
	static const char *const boot[] = {"", "off"};
#else
	static const char *const boot[] = {"off", "off"};
#endif
	MemoryContext cxt = CurrentMemoryContext;
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "nextgres reload", ALLOCSET_SMALL_SIZES);

	MemoryContextSwitchTo(tmp);
	PG_TRY();
	{
		ConfigVariable *head = NULL;
		ConfigVariable *tail = NULL;
		bool		ok;

		ok = ParseConfigFile(ConfigFileName, true, NULL, 0, 0, DEBUG2, &head, &tail);
		if (ok && DataDir)
			ok = ParseConfigFile(PG_AUTOCONF_FILENAME, false, NULL, 0, 0, DEBUG2, &head, &tail);

		/*
		 * An unrecognized parameter (no placeholder prefix) makes the
		 * server apply nothing from the files.
		 */
		for (ConfigVariable *v = head; ok && v; v = v->next)
			if (strchr(v->name, GUC_QUALIFIER_SEPARATOR) == NULL &&
				GetConfigOption(v->name, true, false) == NULL)
				ok = false;
		for (int i = 0; ok && i < lengthof(names); i++)
		{
			const char *value = boot[i];

			for (ConfigVariable *v = head; v; v = v->next)
				if (pg_strcasecmp(v->name, names[i]) == 0)
					value = v->value;
			(void) set_config_option(names[i], value, PGC_POSTMASTER, PGC_S_FILE,
									 GUC_ACTION_SET, true, DEBUG2, false);
		}
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	MemoryContextDelete(tmp);
}

static emit_log_hook_type ng_prev_emit_log_hook = NULL;
static bool ng_emit_hooked = false;
static bool ng_promote_to_fatal = false;

/* Shows the record being raised by log_as_client(promote) as FATAL. */
static void
ng_promote_emit_log_hook(ErrorData *edata)
{
	if (ng_promote_to_fatal && edata->elevel == LOG)
		edata->elevel = FATAL;
	if (ng_prev_emit_log_hook)
		ng_prev_emit_log_hook(edata);
}

/*
 * One LOG record about a pooled client, written by the pooler with
 * log_line_prefix escapes describing the client (%r %h %u %d %a read
 * MyProcPort and application_name, elog.c log_status_format()): the
 * Port-less pooler lends itself one for the record. `promote`: shown as
 * FATAL (see ng_log_client).
 */
static void
log_as_client(bool promote, int code, const char *msg, const char *detail,
			  const char *hint, const char *host, const char *port,
			  const void *laddr, int laddr_len,
			  const char *user, const char *db, const char *appname)
{
	Port		fake;
	Port	   *saved = MyProcPort;
	char	   *saved_app = application_name;

	if (promote && !ng_emit_hooked)
	{
		ng_prev_emit_log_hook = emit_log_hook;
		emit_log_hook = ng_promote_emit_log_hook;
		ng_emit_hooked = true;
	}
	memset(&fake, 0, sizeof(fake));
	fake.remote_host = (char *) host;
	fake.remote_port = (char *) port;
	/* %L (18): the address the client connected to, as pqcomm.c's laddr */
	if (laddr_len > 0 && laddr_len <= (int) sizeof(fake.laddr.addr))
	{
		memcpy(&fake.laddr.addr, laddr, laddr_len);
		fake.laddr.salen = laddr_len;
	}
	fake.user_name = (char *) user;
	fake.database_name = (char *) db;
	fake.application_name = (char *) appname;
	MyProcPort = &fake;
	application_name = (char *) (appname ? appname : "");
	ng_promote_to_fatal = promote;
	PG_TRY();
	{
		ereport(LOG, (code ? errcode(code) : 0, errmsg_internal("%s", msg),
					  detail ? errdetail_log("%s", detail) : 0,
					  hint ? errhint("%s", hint) : 0,
					  errhidestmt(true)));
	}
	PG_FINALLY();
	{
		ng_promote_to_fatal = false;
		MyProcPort = saved;
		application_name = saved_app;
	}
	PG_END_TRY();
}


/*
 * A line about a pooled client: with sqlstate NULL, a connection LOG line
 * (log_connections' lines); otherwise a login the pooler refuses, in the
 * server log as the server logs its own:
 * severity FATAL, the client's %r %h %u %d %a, the SQLSTATE, message, DETAIL
 * (detail: what only the log shows, as errdetail_log) and HINT. The pooler
 * must not exit, so the record is raised at LOG and an emit_log_hook, active
 * only for it, shows it as FATAL (errfinish() decides what to do after the
 * report from the level it read before, so LOG's "carry on" stands). Not
 * written where log_min_messages hides LOG (fatal, panic), unlike a FATAL.
 */
void
ng_log_client(const char *sqlstate, const char *msg, const char *detail,
			  const char *hint, const char *host, const char *port,
			  const void *laddr, int laddr_len,
			  const char *user, const char *db, const char *appname)
{
	int			code = ERRCODE_INTERNAL_ERROR;

	if (sqlstate == NULL)
	{
		log_as_client(false, 0, msg, NULL, NULL, host, port, laddr, laddr_len,
					  user, db, appname);
		return;
	}
	if (strlen(sqlstate) == 5)
		code = MAKE_SQLSTATE(sqlstate[0], sqlstate[1], sqlstate[2], sqlstate[3], sqlstate[4]);
	log_as_client(true, code, msg, detail, hint, host, port, laddr, laddr_len,
				  user, db, appname);
}

/*
 * listen_addresses while the pooler owns the server's port.
 *
 * _PG_init clears listen_addresses (PGC_S_OVERRIDE) so that the postmaster
 * opens no TCP socket of its own. On each reload every process compares the
 * file's value with that running '' (guc.c set_config_option, a
 * PGC_POSTMASTER setting re-read with PGC_SIGHUP): they differ, so the
 * postmaster logged "cannot be changed without restarting the server" and
 * pg_settings showed listen_addresses pending_restart, for ever. A check
 * hook on the setting turns the file's value, when it is the one the pooler
 * bound at start, into the running '' (in place: check hooks may rewrite
 * *newval), so the comparison finds no change; a different value still
 * gets the server's message and pending_restart, as it should, since the
 * pooler binds the new addresses only at the next start. Core has no check
 * hook of its own for listen_addresses (any found is called first).
 */
static char *ng_listen_configured = NULL;
static GucStringCheckHook ng_listen_prev_check = NULL;

static bool
ng_listen_addresses_check(char **newval, void **extra, GucSource source)
{
	if (ng_listen_prev_check && !ng_listen_prev_check(newval, extra, source))
		return false;
	if (*newval != NULL && ng_listen_configured != NULL &&
		strcmp(*newval, ng_listen_configured) == 0)
		(*newval)[0] = '\0';
	return true;
}

/* Postmaster, _PG_init, after listen_addresses was cleared: false when the
 * setting cannot be found (then reloads keep logging as before). */
bool
ng_keep_listen_addresses_on_reload(const char *configured)
{
	struct config_generic *gen = lookup_guc("listen_addresses");
	struct config_string *conf;

	if (gen == NULL || gen->vartype != PGC_STRING)
		return false;
	conf = (struct config_string *) gen;
	/* malloc: lives as long as the process, as GUC values did before 16 */
	ng_listen_configured = strdup(configured);
	if (ng_listen_configured == NULL)
		return false;
	if (conf->check_hook != ng_listen_addresses_check)
	{
		ng_listen_prev_check = conf->check_hook;
		conf->check_hook = ng_listen_addresses_check;
	}
	return true;
}

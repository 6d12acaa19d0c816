/*
 * loginmem.c: a memory context for the pooler's per-login server calls.
 *
 * The pooler runs, once per client login, server code that a backend runs
 * once per life: the hba match, role and database lookups, the checks of
 * startup settings.  Whatever such code pallocs in CurrentMemoryContext
 * outside its own transaction would land in the pooler's TopMemoryContext
 * for the pooler's whole life; inside this context it is freed by the reset
 * after each call.  (Allocations the server makes in long-lived contexts of
 * its own, such as GUCMemoryContext, are not reached by this: see
 * needs_validation in src/pooler/auth.rs.)
 */
#include "postgres.h"

#include "utils/memutils.h"

static MemoryContext login_cxt = NULL;

/* Switches to the login context; returns the context to switch back to. */
MemoryContext
ng_login_context_enter(void)
{
	if (login_cxt == NULL)
		login_cxt = AllocSetContextCreate(TopMemoryContext, "nextgres login",
										  ALLOCSET_SMALL_SIZES);
	return MemoryContextSwitchTo(login_cxt);
}

/* Switches back to `prev` and frees everything allocated since enter. */
void
ng_login_context_leave(MemoryContext prev)
{
	MemoryContextSwitchTo(prev);
	MemoryContextReset(login_cxt);
}

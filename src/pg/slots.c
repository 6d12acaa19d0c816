/*
 * slots.c: how many connection slots (PGPROCs of regular backends) are free,
 * for the pooler to decide whether a pool login can succeed and whether it
 * would take the last slot a direct login of another role could use.
 *
 * Mirrors the check InitPostgres() makes in postinit.c: a login that is not
 * a superuser (or, from 16, a member of pg_use_reserved_connections) is
 * refused with 53300 unless more than the reserved slots are free
 * (superuser_reserved_connections, plus reserved_connections from 16).
 * HaveNFreeProcs() (storage/proc.c) counts ProcGlobal->freeProcs under its
 * spinlock; 15 has no nfree out-parameter.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "postmaster/postmaster.h"
#include "storage/proc.h"

/* Reserved slots: superuser_reserved_connections (+ reserved_connections, 16+). */
void
ng_reserved_slots(int *superuser, int *reserved)
{
#if PG_VERSION_NUM >= 160000
	*superuser = SuperuserReservedConnections;
	*reserved = ReservedConnections;
#else
	*superuser = ReservedBackends;
	*reserved = 0;
#endif
}

/* max_connections (MaxConnections, miscadmin.h). */
int
ng_max_connections(void)
{
	return MaxConnections;
}

/*
 * True when at least `n` slots beyond the reserved ones are free.  Takes
 * ProcStructLock (a spinlock) for a walk of at most that many list entries.
 */
bool
ng_unreserved_slots_free(int n)
{
	int			su,
				res;

	ng_reserved_slots(&su, &res);
#if PG_VERSION_NUM >= 160000
	{
		int			nfree;

		return HaveNFreeProcs(su + res + n, &nfree);
	}
#else
	return HaveNFreeProcs(su + res + n);
#endif
}

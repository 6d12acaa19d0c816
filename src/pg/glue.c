/*
 * glue.c: the few places where nextgres needs PostgreSQL structs or macros that
 * pgrx 0.18 does not bind (Port, HbaLine, PQcommMethods internals, the
 * backend-status write protocol) and where version differences live.
 *
 * Rules: every function here is thin, is compiled against the server headers of
 * the PostgreSQL it will run in (so struct layouts always match, whatever
 * USE_OPENSSL/ENABLE_GSS say), and never lets an ereport(ERROR) escape into Rust
 * frames: errors are caught with PG_TRY and returned as data.
 */
#define _GNU_SOURCE				/* struct ucred */
#include "postgres.h"

#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "commands/discard.h"
#include "commands/event_trigger.h"
#include "common/ip.h"
#include "common/scram-common.h"
#include "libpq/auth.h"
#include "libpq/crypt.h"
#include "libpq/hba.h"
#include "libpq/libpq.h"
#include "libpq/libpq-be.h"
#include "libpq/scram.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "replication/walsender.h"
#include "port/atomics.h"
#include "postmaster/bgworker.h"
#include "postmaster/postmaster.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/backend_status.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/ps_status.h"
#include "utils/relcache.h"
#include "utils/syscache.h"
#include "utils/timeout.h"

#if PG_VERSION_NUM >= 180000
#include "storage/procsignal.h"
#include "storage/waiteventset.h"
#endif

#include "glue.h"

/* ------------------------------------------------------------------------
 * Version differences (keep them all here).
 * ------------------------------------------------------------------------ */

/*
 * The protocol the server speaks: PG_PROTOCOL_LATEST (libpq/pqcomm.h; 3.0 up
 * to 17, 3.2 in 18) and the longest cancel key it issues (4 bytes up to 17,
 * MAX_CANCEL_KEY_LENGTH from storage/procsignal.h in 18).
 */
void
ng_server_protocol(int *newest_minor, int *max_cancel_key)
{
	*newest_minor = PG_PROTOCOL_MINOR(PG_PROTOCOL_LATEST);
#if PG_VERSION_NUM >= 180000
	*max_cancel_key = MAX_CANCEL_KEY_LENGTH;
#else
	*max_cancel_key = sizeof(uint32);
#endif
}

/*
 * Iteration count of the mock SCRAM secret the server uses for a role that
 * has no usable one (auth-scram.c, mock_scram_secret()).  Up to the 2026-05
 * minor releases it is the fixed SCRAM_SHA_256_DEFAULT_ITERATIONS (4096);
 * from the 2026-08 releases (18.5, 17.11, 16.15) it is scram_iterations, so
 * the count no longer tells a probe that the role does not exist.  15 has
 * no scram_iterations and keeps 4096.  The running server's own minor
 * (server_version_num) decides, not the headers this build saw.
 */
int
ng_mock_scram_iterations(void)
{
#if PG_VERSION_NUM >= 160000
	const char *v = GetConfigOption("server_version_num", true, false);
	int			num = v ? atoi(v) : PG_VERSION_NUM;

	if (num >= 180005 ||
		(num >= 170011 && num < 180000) ||
		(num >= 160015 && num < 170000))
		return scram_sha_256_iterations;
	return SCRAM_SHA_256_DEFAULT_ITERATIONS;
#else
	return SCRAM_DEFAULT_ITERATIONS;	/* 15's name for the same 4096 */
#endif
}

/*
 * The file an hba line came from: HbaLine.sourcefile since 16 (include
 * directives), the one pg_hba.conf (hba_file) in 15.
 */
static const char *
hba_line_file(HbaLine *hba)
{
#if PG_VERSION_NUM >= 160000
	return hba->sourcefile ? hba->sourcefile : HbaFileName;
#else
	return HbaFileName;
#endif
}

/* pq_buffer_has_data() became pq_buffer_remaining_data() (a byte count) in 17. */
static bool
recv_buffer_has_data(void)
{
#if PG_VERSION_NUM >= 170000
	return pq_buffer_remaining_data() > 0;
#else
	return pq_buffer_has_data();
#endif
}

/*
 * The server takes direct TLS (a first byte 0x16, no SSLRequest) and
 * negotiates ALPN "postgresql" from 17 on (backend_startup.c
 * ProcessSSLStartup(), be-secure-openssl.c alpn_cb()); before, it has no
 * ALPN and 0x16 is the start of an invalid startup packet length.
 */
bool
ng_server_has_direct_tls(void)
{
	return PG_VERSION_NUM >= 170000;
}

static WaitEventSet *
create_session_wait_set(int nevents)
{
#if PG_VERSION_NUM >= 170000
	return CreateWaitEventSet(NULL, nevents);	/* NULL owner: session lifetime */
#else
	return CreateWaitEventSet(TopMemoryContext, nevents);
#endif
}

static bool
database_connect_allowed(Oid dboid, Oid roleid)
{
#if PG_VERSION_NUM >= 160000
	return object_aclcheck(DatabaseRelationId, dboid, roleid, ACL_CONNECT) == ACLCHECK_OK;
#else
	return pg_database_aclcheck(dboid, roleid, ACL_CONNECT) == ACLCHECK_OK;
#endif
}

/* Error capture shared by the guarded entry points (glue.h). */
void
ng_capture_error(MemoryContext cxt, NgError *err)
{
	ErrorData  *ed;

	MemoryContextSwitchTo(cxt);
	ed = CopyErrorData();
	FlushErrorState();
	strlcpy(err->sqlstate, unpack_sql_state(ed->sqlerrcode), sizeof(err->sqlstate));
	strlcpy(err->message, ed->message ? ed->message : "unknown error", sizeof(err->message));
	strlcpy(err->detail, ed->detail ? ed->detail : "", sizeof(err->detail));
	strlcpy(err->hint, ed->hint ? ed->hint : "", sizeof(err->hint));
	FreeErrorData(ed);
}

/* ------------------------------------------------------------------------
 * Pooled backends: the client socket, the FE/BE wait set, client address.
 * ------------------------------------------------------------------------ */

/*
 * The role and database a live backend logged in as (PGPROC roleId and
 * databaseId, each stored once during its InitPostgres, before its first
 * ReadyForQuery): the pooler checks a pool login by the pid of its
 * BackendKeyData, through the agent (ProcArrayLock needs a PGPROC). Read
 * under the lock, so the PGPROC is that pid's. 1: found; 0: no backend has
 * that pid; -1: refused, this process has no PGPROC (the pooler). An LWLock
 * wait without a PGPROC is a PANIC (lwlock.c), and it waits only under
 * contention: refusing every time makes a wrong caller fail in every test
 * instead of once in production.
 */
int
ng_backend_identity(int pid, uint32 *role, uint32 *db)
{
	PGPROC	   *proc;
	int			found = 0;

	if (MyProc == NULL)
		return -1;
	if (pid <= 0)
		return 0;
	LWLockAcquire(ProcArrayLock, LW_SHARED);
	proc = BackendPidGetProcWithLock(pid);
	if (proc != NULL)
	{
		*role = proc->roleId;
		*db = proc->databaseId;
		found = 1;
	}
	LWLockRelease(ProcArrayLock);
	return found;
}

int
ng_port_sock(void)
{
	return MyProcPort ? MyProcPort->sock : -1;
}

extern bool ng_read_ahead_pending(void);
extern void ng_read_ahead_detach(void);

/* Nothing of the client's unread: neither in the server's buffer nor read
 * ahead (session.c) for it. */
bool
ng_recv_buffer_empty(void)
{
	return !recv_buffer_has_data() && !ng_read_ahead_pending();
}

/*
 * A client that ends with Sync+Terminate in one packet leaves the Terminate
 * buffered at ReadyForQuery.  It is leaving: consume the message so the
 * backend can release the socket (the pooler sees the EOF) instead of
 * exiting on it.  Whatever the client sent after the Terminate is dropped
 * unread, as the server, which exits at a Terminate, never runs it.
 * Returns true if a Terminate was consumed.
 */
bool
ng_consume_buffered_terminate(void)
{
	StringInfoData buf;
	int			c;

	pq_startmsgread();
	c = pq_peekbyte();
	/*
	 * From 17 the buffered amount is known: a Terminate whose length word
	 * is not all here is left to the server, which waits for the rest as
	 * for any message (before 17 it is read here, waiting the same way).
	 */
	if (c != 'X'
#if PG_VERSION_NUM >= 170000
		|| pq_buffer_remaining_data() < 5
#endif
		)
	{
		pq_endmsgread();
		return false;
	}
	(void) pq_getbyte();
	initStringInfo(&buf);
	if (pq_getmessage(&buf, 4) == EOF)
	{
		/*
		 * A Terminate with another length (the COMMERROR is logged), or the
		 * client went away: pqcomm.c leaves the message read half done, so
		 * the next client's first message would end with "protocol
		 * synchronization was lost".  This backend ends instead, as the
		 * server ends a session after such a message; the pooler closes
		 * the client.
		 */
		proc_exit(0);
	}
	pfree(buf.data);
	pq_startmsgread();
	while (recv_buffer_has_data())
		(void) pq_getbyte();
	pq_endmsgread();
	ng_read_ahead_detach();
	return true;
}

/*
 * epoll follows file descriptions, not fd numbers: once another socket is
 * under MyProcPort->sock, the FE/BE wait set's socket entry still watches
 * the old one, and PostgreSQL has no call to re-point it (ModifyWaitEvent
 * only changes the mask of the existing entry; ng_port_set_sock rewrites the
 * entry's fd, which is what ModifyWaitEvent hands epoll_ctl).  Rebuilding
 * the set per attach (epoll_create, three epoll_ctl, close) cost ~9% of a
 * pooled backend's CPU in the prototype, so the set is built once, at the
 * first attach, and then only its socket entry moves: detach deletes it
 * before the client's socket leaves `sock`, attach adds it for the next one
 * with the same WaitEvent pointer and the mask PostgreSQL derives from the
 * event's flags.  The set's epoll fd is learned when it is built (the lowest
 * free fd, confirmed in /proc) and its socket event from a zero-timeout
 * epoll_wait (the socket is writable); if either cannot be confirmed, the
 * set is rebuilt on every attach instead.
 */
static int	febe_epoll_fd = -1;
static WaitEvent *febe_socket_event = NULL;
static bool febe_socket_in_set = false;

/*
 * The client's socket joins the set only when the server first waits on it.
 * Under saturation a client is attached when its query is there, and given
 * back at ReadyForQuery before the server reads again, so most attaches
 * never wait on the socket: the EPOLL_CTL_ADD at attach and the DEL at
 * release were two system calls per handoff for nothing.  Every wait on
 * FeBeWaitSet's socket in the server (secure_read, secure_write,
 * pq_check_connection, WalSndWait, and linger here) first calls
 * ModifyWaitEvent with the mask it needs; the attach sets the socket
 * event's mask to 0, so that call always reaches epoll_ctl(EPOLL_CTL_MOD),
 * which the executable's redirected epoll_ctl turns into the ADD.  Where
 * the redirection cannot be installed, attach adds the socket as before.
 */
extern bool ng_patch_executable_got(const char *name, void *fn);
/* The system call itself: no symbol lookup that could find the redirect. */
static int
real_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	return (int) syscall(SYS_epoll_ctl, epfd, op, fd, ev);
}
static bool febe_socket_pending = false;

/* Installed in place of the executable's epoll_ctl(). */
static int
ng_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	int			rc;

	if (!febe_socket_pending || op != EPOLL_CTL_MOD || epfd != febe_epoll_fd ||
		MyProcPort == NULL || fd != MyProcPort->sock)
		return real_epoll_ctl(epfd, op, fd, ev);
	rc = real_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, ev);
	if (rc == 0)
	{
		febe_socket_pending = false;
		febe_socket_in_set = true;
	}
	else
	{
		/*
		 * ModifyWaitEvent stored the mask before this call and now raises
		 * ERROR: unstored, so that the next call with the same mask tries
		 * again instead of returning early into a wait without the socket.
		 */
		febe_socket_event->events = 0;
	}
	return rc;
}

/* Once per backend: can the socket's registration wait for a ModifyWaitEvent? */
static bool
febe_lazy_ready(void)
{
	static int	state = 0;		/* 0 unknown, 1 yes, -1 no */

	if (state == 0)
		state = ng_patch_executable_got("epoll_ctl", (void *) ng_epoll_ctl) ? 1 : -1;
	return state > 0;
}

static bool
fd_is_epoll(int fd)
{
	char		path[64];
	char		target[64];
	ssize_t		n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n <= 0)
		return false;
	target[n] = '\0';
	return strcmp(target, "anon_inode:[eventpoll]") == 0;
}

/* The set exactly as pq_init() builds it: socket, latch, postmaster death. */
static void
febe_build(void)
{
	int			probe;

	if (FeBeWaitSet)
		FreeWaitEventSet(FeBeWaitSet);
	FeBeWaitSet = NULL;
	probe = fcntl(0, F_DUPFD_CLOEXEC, 0);	/* the lowest free fd */
	if (probe >= 0)
		close(probe);
	FeBeWaitSet = create_session_wait_set(FeBeWaitSetNEvents);
	AddWaitEventToSet(FeBeWaitSet, WL_SOCKET_WRITEABLE, MyProcPort->sock, NULL, NULL);
	AddWaitEventToSet(FeBeWaitSet, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(FeBeWaitSet, WL_POSTMASTER_DEATH, PGINVALID_SOCKET, NULL, NULL);
	febe_socket_in_set = true;
	febe_socket_pending = false;
	febe_epoll_fd = -1;
	febe_socket_event = NULL;
	if (probe >= 0 && fd_is_epoll(probe))
	{
		struct epoll_event evs[FeBeWaitSetNEvents];
		int			n = epoll_wait(probe, evs, lengthof(evs), 0);

		for (int i = 0; i < n; i++)
		{
			WaitEvent  *e = (WaitEvent *) evs[i].data.ptr;

			if (e != NULL && e->pos == FeBeWaitSetSocketPos && e->fd == MyProcPort->sock &&
				(e->events & WL_SOCKET_WRITEABLE))
			{
				febe_epoll_fd = probe;
				febe_socket_event = e;
			}
		}
	}
}

/*
 * An ERROR here would unwind into the Rust frames of the boundary (their
 * state and borrows left half-done): between transactions, a failure of the
 * server's wait machinery (epoll_create or epoll_ctl: ENOMEM, EMFILE,
 * ENOSPC) ends the backend as a FATAL instead, logged with its message; the
 * pool logs in another.  `cxt` is the memory context the guarded code
 * started in.
 */
static void
rethrow_as_fatal(MemoryContext cxt)
{
	ErrorData  *e;

	MemoryContextSwitchTo(cxt);
	e = CopyErrorData();
	FlushErrorState();
	ereport(FATAL,
			(errcode(ERRCODE_INTERNAL_ERROR),
			 errmsg("nextgres: error in a pooled backend between transactions: %s", e->message)));
}

/*
 * Login event triggers (17+) for a client's session starting on this pooled
 * backend, as PostgresMain() fires them after a direct login
 * (event_trigger.c EventTriggerOnLogin()), in the client's session: its
 * role, settings, application_name, address and SYSTEM_USER are in place.
 * The database's flag is read again first: InitPostgres() read it when the
 * backend logged in, maybe before the first trigger was created.  A trigger's
 * ERROR ends the session as it ends a direct login, where no error handler is
 * set up yet: FATAL, with the trigger's own code and words, to the client;
 * this backend exits with it (the pool logs in another).  A `login` trigger
 * also fires for each pool login, a backend's own (its session is no client's:
 * `application_name` empty, over the Unix socket).
 */
void
ng_fire_login_triggers(void)
{
#if PG_VERSION_NUM >= 170000
	MemoryContext cxt = CurrentMemoryContext;
	uint32		held = QueryCancelHoldoffCount;

	if (!OidIsValid(MyDatabaseId))
		return;
	PG_TRY();
	{
		HeapTuple	tup;
		bool		has = false;

		StartTransactionCommand();
		tup = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(MyDatabaseId));
		if (HeapTupleIsValid(tup))
		{
			has = ((Form_pg_database) GETSTRUCT(tup))->dathasloginevt;
			ReleaseSysCache(tup);
		}
		CommitTransactionCommand();
		MyDatabaseHasLoginEventTriggers = has;

		/*
		 * The boundary holds off cancels (CancelHeld): let lock_timeout and
		 * a cancel reach the triggers, as at a direct login (where they end
		 * it as FATAL too).
		 */
		QueryCancelHoldoffCount = 0;
		EventTriggerOnLogin();
		QueryCancelHoldoffCount = held;
	}
	PG_CATCH();
	{
		ErrorData  *e;

		QueryCancelHoldoffCount = held;
		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		if (e->elevel < FATAL)
			e->elevel = FATAL;
		ThrowErrorData(e);
		/* not reached: FATAL exits */
		proc_exit(1);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
#endif
}

/*
 * Runs a pooled backend's transaction-boundary work (Rust: give the client
 * back, park, attach the next one) under a PG_TRY: an ERROR that escapes a
 * call it makes into the server ends this backend with a FATAL, instead of
 * a longjmp into PostgresMain past Rust frames whose state (a borrowed
 * RefCell) the next ReadyForQuery would trip over, aborting the process and
 * restarting the whole cluster.
 */
void
ng_run_guarded(void (*fn) (void))
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		fn();
	}
	PG_CATCH();
	{
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
}

/*
 * Points the server at another socket without a dup2() onto the old number:
 * MyProcPort->sock, and FeBeWaitSet's socket entry, whose fd is what
 * ModifyWaitEvent hands epoll_ctl.  Only while the socket is out of the set
 * (after ng_febe_detach, before ng_febe_attach).
 */
void
ng_port_set_sock(int fd)
{
	MyProcPort->sock = fd;
	if (febe_socket_event != NULL)
		febe_socket_event->fd = fd;
}

static void
febe_attach(void)
{
	struct epoll_event ev;

	if (febe_epoll_fd < 0 || febe_socket_in_set)
	{
		febe_build();
		return;
	}
	if (febe_lazy_ready())
	{
		/* Added by the first ModifyWaitEvent (ng_epoll_ctl), if any. */
		febe_socket_event->events = 0;
		febe_socket_pending = true;
		return;
	}
	ev.data.ptr = febe_socket_event;
	ev.events = EPOLLERR | EPOLLHUP;
	if (febe_socket_event->events & WL_SOCKET_READABLE)
		ev.events |= EPOLLIN;
	if (febe_socket_event->events & WL_SOCKET_WRITEABLE)
		ev.events |= EPOLLOUT;
	if (febe_socket_event->events & WL_SOCKET_CLOSED)
		ev.events |= EPOLLRDHUP;
	if (epoll_ctl(febe_epoll_fd, EPOLL_CTL_ADD, MyProcPort->sock, &ev) < 0)
	{
		febe_build();
		return;
	}
	febe_socket_in_set = true;
}

/* After ng_port_set_sock put the client's socket under MyProcPort->sock. */
void
ng_febe_attach(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		febe_attach();
	}
	PG_CATCH();
	{
		/*
		 * The set may be gone or half built: writing the FATAL to the client
		 * would wait on it (secure_write).  The log has it; the client sees
		 * its connection close.
		 */
		whereToSendOutput = DestNone;
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
}

/*
 * client_connection_check_interval's timer checks "the client" at its next
 * expiry whenever !DoingCommandRead, and a pooled backend waits between
 * transactions (lingering with its client, or parked without one) inside the
 * flush of ReadyForQuery, before ReadCommand sets DoingCommandRead.  A direct
 * connection leaves the timer running after ReadyForQuery and ignores its
 * expiry while idle; here it would check a socket slot that holds no client
 * while parked (ENOENT from epoll_ctl, an ERROR), and wake a lingering
 * backend at every interval to look at an idle client, which the linger
 * itself watches.  The client's next statement arms it again
 * (start_xact_command).
 */
void
ng_connection_check_stop(void)
{
	if (get_timeout_active(CLIENT_CONNECTION_CHECK_TIMEOUT))
		disable_timeout(CLIENT_CONNECTION_CHECK_TIMEOUT, false);
	CheckClientConnectionPending = false;
}

/* Before the client's socket leaves MyProcPort->sock. */
void
ng_febe_detach(void)
{
	ng_connection_check_stop();
	/* A client's bytes never reach the next client's session. */
	ng_read_ahead_detach();
	febe_socket_pending = false;	/* never waited on: nothing to delete */
	if (febe_epoll_fd < 0 || !febe_socket_in_set)
		return;
	if (epoll_ctl(febe_epoll_fd, EPOLL_CTL_DEL, MyProcPort->sock, NULL) == 0)
		febe_socket_in_set = false;
	else
		febe_epoll_fd = -1;		/* rebuild at the next attach */
}

/* The user_data of a park wait set's kernel queue event. */
static char park_queue_marker;
/* The user_data of a park wait set's hold event (an epoll instance holding
 * the socket of the queued client the backend keeps idle, or nothing). */
static char park_hold_marker;

/* The park wait set with a kernel queue (a backend builds one) and the
 * position of the queue's event in it (ng_park_watch_queue). */
static WaitEventSet *park_queue_set = NULL;
static int	park_queue_pos = -1;

/* A wait set for parking: control socket readable, latch, postmaster death,
 * and a pool's kernel queue when queue_fd >= 0. */
void *
ng_park_wait_set_create(int control_fd, int queue_fd, int hold_fd)
{
	MemoryContext cxt = CurrentMemoryContext;
	WaitEventSet *volatile set = NULL;

	PG_TRY();
	{
		set = create_session_wait_set(3 + (queue_fd >= 0) + (hold_fd >= 0));
		AddWaitEventToSet(set, WL_SOCKET_READABLE, control_fd, NULL, NULL);
		/* A pool's kernel queue (an epoll instance: readable while a
		 * client in it is ready), told apart by its user_data. */
		if (queue_fd >= 0)
		{
			park_queue_pos = AddWaitEventToSet(set, WL_SOCKET_READABLE, queue_fd, NULL, &park_queue_marker);
			park_queue_set = set;
		}
		if (hold_fd >= 0)
			AddWaitEventToSet(set, WL_SOCKET_READABLE, hold_fd, NULL, &park_hold_marker);
		AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		AddWaitEventToSet(set, WL_POSTMASTER_DEATH, PGINVALID_SOCKET, NULL, NULL);
	}
	PG_CATCH();
	{
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
	return set;
}

/*
 * Whether waits on `set` (the one with a kernel queue) report the queue's
 * ready clients: a backend keeping its idle client in a pool with no more
 * clients than backends leaves them to the free backends (park.rs
 * kq_hold).  "Not watched" is a wait for the queue's epoll instance to be
 * writable, which it never is (epoll(7): only readable): ModifyWaitEvent
 * wants a socket event to wait for something.  No system call when the
 * mask is already that one.
 */
void
ng_park_watch_queue(void *set, bool on)
{
	MemoryContext cxt = CurrentMemoryContext;

	if (set != park_queue_set || park_queue_pos < 0)
		return;
	PG_TRY();
	{
		ModifyWaitEvent((WaitEventSet *) set, park_queue_pos,
						on ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE, NULL);
	}
	PG_CATCH();
	{
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
}

/*
 * One wait between transactions (parked, or lingering with an idle client):
 * 1 socket readable, 2 latch set, 3 postmaster death, 0 timeout.
 * `arm_client`: first set FeBeWaitSet's client socket to readable (its lazy
 * ADD, ng_epoll_ctl, can fail: ENOMEM, ENOSPC).  An ERROR ends the backend
 * as a FATAL (rethrow_as_fatal).
 */
static int
wait_between_transactions(WaitEventSet *set, long timeout_ms, uint32 wait_event, bool arm_client)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile int rc = 0;

	PG_TRY();
	{
		WaitEvent	ev;

		if (arm_client)
			ModifyWaitEvent(set, FeBeWaitSetSocketPos, WL_SOCKET_READABLE, NULL);
		if (WaitEventSetWait(set, timeout_ms, &ev, 1, wait_event) == 0)
			rc = 0;
		else if (ev.events & WL_POSTMASTER_DEATH)
			rc = 3;
		else if (ev.events & WL_LATCH_SET)
			rc = 2;
		else if (ev.user_data == &park_queue_marker)
			rc = 4;
		else if (ev.user_data == &park_hold_marker)
			rc = 5;
		else
			rc = 1;
	}
	PG_CATCH();
	{
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
	return rc;
}

/* Parked: 1 control socket readable (see wait_between_transactions). */
int
ng_park_wait(void *set, long timeout_ms)
{
	return wait_between_transactions((WaitEventSet *) set, timeout_ms, PG_WAIT_CLIENT, false);
}

/*
 * While parked the backend has no client: a cancel must not raise an ERROR
 * (its ErrorResponse would go to the pooler) and catch-up interrupts must be
 * served, since nobody reads the socket to do it.  Terminate and shutdown still
 * go through CHECK_FOR_INTERRUPTS (FATAL, which exits; PG_TRY passes FATAL
 * through, it does not return).
 */
static void
service_interrupts(bool notify)
{
	MemoryContext cxt = CurrentMemoryContext;

	ResetLatch(MyLatch);

	/*
	 * A cancel aimed at the client just given back (the pooler routes it by
	 * its books, which can lag a moment) is held and dropped.  Anything that
	 * still raises an ERROR here (catch-up processing, a NOTIFY delivery
	 * while lingering: none known to) must not unwind into the Rust frames
	 * of the boundary: it ends the backend as a FATAL instead, logged with
	 * its message; the pool logs in another.
	 */
	HOLD_CANCEL_INTERRUPTS();
	PG_TRY();
	{
		if (catchupInterruptPending)
			ProcessCatchupInterrupt();
		CHECK_FOR_INTERRUPTS();
		if (notify && notifyInterruptPending)
			ProcessNotifyInterrupt(true);

		/*
		 * The statistics a transaction left pending (pgstat_report_stat()
		 * keeps them for up to a second) are flushed when the idle timer
		 * fires; the server does so only while it reads a command
		 * (DoingCommandRead), which a parked or lingering backend never
		 * is, so they would wait for its next client: tuple counts, and
		 * with them autovacuum's thresholds, lagging on a quiet pool.
		 */
		if (IdleStatsUpdateTimeoutPending && !IsTransactionOrTransactionBlock())
		{
			IdleStatsUpdateTimeoutPending = false;
			pgstat_report_stat(true);
		}
	}
	PG_CATCH();
	{
		rethrow_as_fatal(cxt);
	}
	PG_END_TRY();
	RESUME_CANCEL_INTERRUPTS();
	QueryCancelPending = false;
}

void
ng_park_service_interrupts(void)
{
	service_interrupts(false);
}

/*
 * Lingering: after ReadyForQuery(I) the backend keeps its client while no
 * other client waits, watching the client's socket (its next query) and the
 * latch (the pooler's release request, or interrupts) through FeBeWaitSet.
 * Returns 1 client readable, 2 latch set, 3 postmaster death, 0 timeout.
 */
int
ng_linger_wait(long timeout_ms)
{
	return wait_between_transactions(FeBeWaitSet, timeout_ms, WAIT_EVENT_CLIENT_READ, true);
}

/*
 * While a backend keeps an idle client (lingering) the client is attached:
 * LISTEN notifications go to it as on a direct connection.
 */
void
ng_linger_service_interrupts(void)
{
	service_interrupts(true);
}

/*
 * A new client is attached: what was pending for the previous one does not
 * concern it.  A cancel, and a lost connection: a NOTIFY written to a
 * lingering client that had just reset its connection sets
 * ClientConnectionLost, which the server acts on at its next interrupt
 * check (FATAL "connection to client lost"): that would be the new
 * client's first read.
 */
void
ng_clear_stale_cancel(void)
{
	QueryCancelPending = false;
	ClientConnectionLost = false;
}

bool
ng_idle_session_timer_suspend(void)
{
	if (get_timeout_active(IDLE_SESSION_TIMEOUT))
	{
		disable_timeout(IDLE_SESSION_TIMEOUT, false);
		return true;
	}
	return false;
}

void
ng_idle_session_timer_resume(void)
{
	if (IdleSessionTimeout > 0)
		enable_timeout_after(IDLE_SESSION_TIMEOUT, IdleSessionTimeout);
}

/*
 * Make inet_client_addr(), log_line_prefix %h/%r and
 * pg_stat_activity.client_addr show the real client.  The pooler sends the
 * address with the fd, so no getpeername() here.
 */
static char *remote_host_buf = NULL;
static char *remote_port_buf = NULL;

void
ng_set_client_addr(const struct sockaddr_storage *addr, socklen_t salen,
				   const struct sockaddr_storage *local, socklen_t local_len_given)
{
	char		host[NI_MAXHOST];
	char		serv[NI_MAXSERV];
	volatile PgBackendStatus *be = MyBEEntry;
	struct sockaddr_storage local_buf;
	socklen_t	local_len = sizeof(local_buf);

	memcpy(&MyProcPort->raddr.addr, addr, salen);
	MyProcPort->raddr.salen = salen;

	/*
	 * inet_server_addr()/inet_server_port() read laddr: make it the address
	 * the client connected to (the pooler's listener), as the postmaster's
	 * accept does for a direct connection, not the pool login's Unix socket.
	 * The pooler sends it (read once per connection, at its accept): no
	 * getsockname() per client here, and a TLS client's socket here is the
	 * relay's socketpair, which has no such address.
	 */
	if (local_len_given > 0 && local_len_given <= sizeof(MyProcPort->laddr.addr))
	{
		memcpy(&MyProcPort->laddr.addr, local, local_len_given);
		MyProcPort->laddr.salen = local_len_given;
	}
	else if (getsockname(MyProcPort->sock, (struct sockaddr *) &local_buf, &local_len) == 0 &&
			 local_len <= sizeof(MyProcPort->laddr.addr))
	{
		memcpy(&MyProcPort->laddr.addr, &local_buf, local_len);
		MyProcPort->laddr.salen = local_len;
	}
#if PG_VERSION_NUM >= 180000
	/* %L caches its text on first use (elog.c): this client's, from laddr */
	MyProcPort->local_host[0] = '\0';
#endif

	host[0] = serv[0] = '\0';
	pg_getnameinfo_all(&MyProcPort->raddr.addr, salen, host, sizeof(host),
					   serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV);
	/*
	 * The server strdup()s these at login; point them once at buffers of our
	 * own and overwrite those on every attach (no allocation per client).
	 */
	if (remote_host_buf == NULL)
	{
		remote_host_buf = MemoryContextAllocZero(TopMemoryContext, NI_MAXHOST);
		remote_port_buf = MemoryContextAllocZero(TopMemoryContext, NI_MAXSERV);
	}
	strlcpy(remote_host_buf, host, NI_MAXHOST);
	strlcpy(remote_port_buf, serv, NI_MAXSERV);
	MyProcPort->remote_host = remote_host_buf;
	MyProcPort->remote_port = remote_port_buf;
	MyProcPort->remote_hostname = NULL;

	if (be)
	{
		PGSTAT_BEGIN_WRITE_ACTIVITY(be);
		memcpy((void *) &be->st_clientaddr, &MyProcPort->raddr, sizeof(SockAddr));
		be->st_clienthostname[0] = '\0';
		PGSTAT_END_WRITE_ACTIVITY(be);
	}
	/* Cleared while parked (ng_report_parked); a switch sets it again too. */
	pgstat_report_appname(application_name ? application_name : "");
}

/*
 * Auth methods as the pooler numbers them (HbaMethod in glue.rs,
 * control::AUTHN_* in the core crate), mapped from and to the server's
 * UserAuth by map_auth_method() and ng_user_auth().
 */
#define NG_AUTH_ERROR			(-1)
#define NG_AUTH_IMPLICIT_REJECT	0
#define NG_AUTH_REJECT			1
#define NG_AUTH_TRUST			2
#define NG_AUTH_PASSWORD		3
#define NG_AUTH_MD5				4
#define NG_AUTH_SCRAM			5
#define NG_AUTH_OTHER			6
#define NG_AUTH_CERT			7

/* ------------------------------------------------------------------------
 * SYSTEM_USER of a pooled session (16+).
 *
 * The server fixes it once, at the backend's own login: InitPostgres() calls
 * InitializeSystemUser() (miscinit.c), which stores "method:authn_id" in a
 * file-static pointer that GetSystemUser() returns and nothing resets.  A
 * pooled backend's login is the pool's (the Unix-socket line), so without
 * help every client would see that one (NULL over trust).  The pointer is
 * found through GetSystemUser()'s own code, which is `return SystemUser;`:
 * on x86-64 one RIP-relative load, optionally after endbr64 and a frame
 * pointer prologue.  The address found must lie in a writable segment of the
 * executable, and GetSystemUser() must return a sentinel stored there before
 * it is used; anywhere else (another instruction set, another compiler's
 * code) SYSTEM_USER stays the pool login's, as README says.
 * ------------------------------------------------------------------------ */
#if PG_VERSION_NUM >= 160000

typedef struct WritableRange
{
	uintptr_t	addr;
	bool		found;
} WritableRange;

/* Is r->addr (a pointer's worth) inside a writable PT_LOAD of the executable? */
static int
in_writable_segment(struct dl_phdr_info *info, size_t size, void *data)
{
	WritableRange *r = (WritableRange *) data;

	(void) size;
	for (int i = 0; i < info->dlpi_phnum; i++)
	{
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t	lo = info->dlpi_addr + ph->p_vaddr;

		if (ph->p_type == PT_LOAD && (ph->p_flags & PF_W) &&
			r->addr >= lo && r->addr + sizeof(void *) <= lo + ph->p_memsz)
			r->found = true;
	}
	return 1;					/* the first object is the executable */
}

static const char **
system_user_slot(void)
{
	static int	state = 0;		/* 0 not looked for, 1 found, -1 not found */
	static const char **slot = NULL;

	if (state != 0)
		return slot;
	state = -1;
#if defined(__x86_64__)
	{
		const unsigned char *f = (const unsigned char *) &GetSystemUser;
		static const unsigned char endbr64[] = {0xf3, 0x0f, 0x1e, 0xfa};
		static const unsigned char prologue[] = {0x55, 0x48, 0x89, 0xe5};	/* push %rbp; mov %rsp,%rbp */
		bool		framed = false;
		int32		disp;
		uintptr_t	addr;
		WritableRange range;
		static const char sentinel[] = "nextgres";
		const char *saved;

		if (memcmp(f, endbr64, sizeof(endbr64)) == 0)
			f += sizeof(endbr64);
		if (memcmp(f, prologue, sizeof(prologue)) == 0)
		{
			f += sizeof(prologue);
			framed = true;
		}
		/* mov disp32(%rip),%rax, then ret (or pop %rbp; ret) */
		if (f[0] != 0x48 || f[1] != 0x8b || f[2] != 0x05)
			return NULL;
		if (framed ? (f[7] != 0x5d || f[8] != 0xc3) : f[7] != 0xc3)
			return NULL;
		memcpy(&disp, f + 3, sizeof(disp));
		addr = (uintptr_t) (f + 7) + (intptr_t) disp;
		range.addr = addr;
		range.found = false;
		dl_iterate_phdr(in_writable_segment, &range);
		if (!range.found)
			return NULL;
		saved = *(const char **) addr;
		*(const char **) addr = sentinel;
		if (GetSystemUser() == sentinel)
			slot = (const char **) addr;
		*(const char **) addr = saved;
		if (slot)
			state = 1;
	}
#endif
	return slot;
}

/* The UserAuth of an NG_AUTH_* code the pooler sends (one with an identity). */
static UserAuth
ng_user_auth(int method)
{
	switch (method)
	{
		case NG_AUTH_PASSWORD:
			return uaPassword;
		case NG_AUTH_MD5:
			return uaMD5;
		case NG_AUTH_SCRAM:
			return uaSCRAM;
		case NG_AUTH_CERT:
			return uaCert;
		default:
			return uaReject;
	}
}
#endif

#if PG_VERSION_NUM >= 160000
/*
 * Points SYSTEM_USER at "method:id" (NULL: none), as InitializeSystemUser()
 * builds it.  False when its pointer was not found.
 */
static bool
set_system_user(UserAuth ua, const char *authn_id)
{
	static char *ours = NULL;	/* the string we set last */
	const char **slot = system_user_slot();
	char	   *s = NULL;

	if (slot == NULL)
		return false;
	if (authn_id)
	{
		const char *name = hba_authname(ua);
		size_t		len = strlen(name) + 1 + strlen(authn_id) + 1;

		s = MemoryContextAlloc(TopMemoryContext, len);
		snprintf(s, len, "%s:%s", name, authn_id);
	}
	*slot = s;
	if (ours)
		pfree(ours);
	ours = s;
	return true;
}
#endif

/*
 * Makes this backend's authenticated identity the attached client's, as the
 * server's login would have set it (auth.c set_authn_id(), miscinit.c
 * InitializeSystemUser()): MyClientConnectionInfo, which parallel workers
 * copy and turn into their SYSTEM_USER, and the leader's own SYSTEM_USER.
 * `id` is `len` bytes (no NUL among them); NULL: no identity (trust).  Only
 * an allocation failure in TopMemoryContext could raise, as anywhere in a
 * backend.  Returns false where SYSTEM_USER could not be set (15 has none;
 * its pointer not found).
 */
bool
ng_set_client_identity(int method, const char *id, int len)
{
#if PG_VERSION_NUM >= 160000
	UserAuth	ua = ng_user_auth(method);
	const char *cur = MyClientConnectionInfo.authn_id;
	char	   *authn_id = NULL;

	if (ua == uaReject || id == NULL || len < 0)
		len = -1;

	/*
	 * The same identity as the backend's now (most switches: a pool's
	 * clients share a role and a method): nothing to do.  Both variables are
	 * always set together (here, or by the server's login), so one decides.
	 */
	if (len < 0 ? cur == NULL :
		(cur != NULL && MyClientConnectionInfo.auth_method == ua &&
		 strlen(cur) == (size_t) len && memcmp(cur, id, len) == 0))
		return system_user_slot() != NULL;
	if (len >= 0)
	{
		authn_id = MemoryContextAlloc(TopMemoryContext, len + 1);
		memcpy(authn_id, id, len);
		authn_id[len] = '\0';
	}
	if (cur)
		pfree((void *) cur);
	MyClientConnectionInfo.authn_id = authn_id;
	MyClientConnectionInfo.auth_method = authn_id ? ua : 0;
	return set_system_user(ua, authn_id);
#else
	(void) method;
	(void) id;
	(void) len;
	return false;
#endif
}

/*
 * Copies a string the pooler sent (UTF-8) into a PgBackendSSLStatus field as
 * pgstat_bestart() fills it through be_tls_get_peer_subject_name() and
 * friends: strlcpy() to NAMEDATALEN - 1 bytes.  The server converts DNs to
 * the database encoding (X509_NAME_to_cstring: pg_any_to_server); here a
 * database whose encoding is neither UTF8 nor SQL_ASCII gets '?' for each
 * non-ASCII byte instead, so that nothing can raise an error while a client
 * is being attached.
 */
#ifdef USE_SSL
static void
ng_ssl_field(char *dst, const char *src)
{
	int			enc = GetDatabaseEncoding();

	strlcpy(dst, src, NAMEDATALEN);
	if (enc != PG_UTF8 && enc != PG_SQL_ASCII)
	{
		for (char *p = dst; *p; p++)
			if (IS_HIGHBIT_SET(*p))
				*p = '?';
	}
}
#endif

/*
 * Agent, at a reload with ssl on: does the server's own TLS library take the
 * ssl_* files and settings as they are now?  Runs the server's be_tls_init()
 * (be-secure-openssl.c) as the postmaster runs it at a reload (isServerStart
 * false: OpenSSL's checks of the certificate, e.g. "ca md too weak" at its
 * security level, the key file's ownership and mode, ssl_passphrase_command
 * only where it supports reload, protocol and cipher settings), quietly: its
 * LOG lines are the postmaster's to write.  The postmaster keeps its previous
 * context when this fails ("SSL configuration was not reloaded"), and the
 * pooler keeps its own then.  The context this builds stays in the agent,
 * unused (the next call frees it).  True on a server built without SSL
 * support (nothing to check).
 */
bool
ng_server_tls_config_loads(void)
{
#ifdef USE_SSL
	MemoryContext cxt = CurrentMemoryContext;
	int			save_log = log_min_messages;
	volatile bool ok = false;

	log_min_messages = PANIC;
	PG_TRY();
	{
		ok = be_tls_init(false) == 0;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		ok = false;
	}
	PG_END_TRY();
	log_min_messages = save_log;
	return ok;
#else
	return true;
#endif
}

/*
 * pg_stat_ssl for a client whose TLS the pooler terminates (the backend sees
 * a socketpair): fills this backend's own PgBackendStatus SSL fields with the
 * pooler's values, as pgstat_bestart() (backend_status.c) does for a direct
 * TLS connection, under the same changecount write protocol on MyBEEntry;
 * on = false clears them (st_ssl = false, the struct zeroed) for a plaintext
 * client or when the client leaves.  A server built without SSL support has
 * no such fields: nothing to do.  The layout is the same in 15 to 18.
 */
void
ng_set_ssl_status(bool on, int bits, const char *version, const char *cipher,
				  const char *client_dn, const char *client_serial,
				  const char *issuer_dn)
{
#ifdef USE_SSL
	volatile PgBackendStatus *be = MyBEEntry;
	PgBackendSSLStatus s;

	if (be == NULL || be->st_sslstatus == NULL)
		return;
	memset(&s, 0, sizeof(s));
	if (on)
	{
		s.ssl_bits = bits;
		ng_ssl_field(s.ssl_version, version);
		ng_ssl_field(s.ssl_cipher, cipher);
		ng_ssl_field(s.ssl_client_dn, client_dn);
		ng_ssl_field(s.ssl_client_serial, client_serial);
		ng_ssl_field(s.ssl_issuer_dn, issuer_dn);
	}
	PGSTAT_BEGIN_WRITE_ACTIVITY(be);
	be->st_ssl = on;
	memcpy(be->st_sslstatus, &s, sizeof(PgBackendSSLStatus));
	PGSTAT_END_WRITE_ACTIVITY(be);
#endif
}

void
ng_report_parked(void)
{
	volatile PgBackendStatus *be = MyBEEntry;

	pgstat_report_activity(STATE_IDLE, "<nextgres: parked>");
	set_ps_display("parked");
	/*
	 * The departed client's application_name (which every role may read in
	 * pg_stat_activity) and address are not shown on after it: a direct
	 * session's row goes with it.  ng_set_client_addr() shows the next
	 * client's, whose application_name may be the one still in force.
	 */
	pgstat_report_appname("");
	if (be)
	{
		PGSTAT_BEGIN_WRITE_ACTIVITY(be);
		memset((void *) &be->st_clientaddr, 0, sizeof(SockAddr));
		be->st_clienthostname[0] = '\0';
		PGSTAT_END_WRITE_ACTIVITY(be);
	}
}

/*
 * The pooled-backend marker is a startup option; take it out of the list so it
 * never becomes a setting anybody can SHOW.  Returns false when absent.
 */
bool
ng_port_take_option(void *p, const char *name, char *buf, size_t buflen)
{
	Port	   *port = (Port *) p;
	int			i = 0;
	ListCell   *lc;

	foreach(lc, port->guc_options)
	{
		if (i % 2 == 0 && strcmp((char *) lfirst(lc), name) == 0)
		{
			strlcpy(buf, (char *) list_nth(port->guc_options, i + 1), buflen);
			port->guc_options = list_delete_nth_cell(port->guc_options, i + 1);
			port->guc_options = list_delete_nth_cell(port->guc_options, i);
			return true;
		}
		i++;
	}
	return false;
}

/* Pid of the Unix-socket peer (SO_PEERCRED), or -1 for TCP / failure. */
int
ng_port_peer_pid(void *p)
{
	Port	   *port = (Port *) p;
	struct ucred cred;
	socklen_t	len = sizeof(cred);

	if (port->raddr.addr.ss_family != AF_UNIX)
		return -1;
	if (getsockopt(port->sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
		return -1;
	return cred.pid;
}

/*
 * This backend's cancel key as the client gets it in BackendKeyData (network
 * byte order); returns its length, 0 if unknown yet.
 */
int
ng_my_cancel_key(uint8 *buf, int buflen)
{
#if PG_VERSION_NUM >= 180000
	if (MyCancelKeyLength <= 0 || MyCancelKeyLength > buflen)
		return 0;
	memcpy(buf, MyCancelKey, MyCancelKeyLength);
	return MyCancelKeyLength;
#else
	uint32		k = pg_hton32((uint32) MyCancelKey);

	if (buflen < (int) sizeof(k))
		return 0;
	memcpy(buf, &k, sizeof(k));
	return sizeof(k);
#endif
}

/*
 * Server authentication of a client the pooler passed to this login
 * (backend/login.rs server_auth): the client's TCP socket is already under
 * MyProcPort->sock and in FeBeWaitSet.  Make raddr/laddr/remote_host/
 * remote_port the client's (getpeername/getsockname, as the postmaster's
 * accept and BackendInitialize() fill them), forget the identity the
 * pooler's own Unix-socket login set (auth.c set_authn_id() refuses a second
 * one), then run the server's ClientAuthentication() (auth.c) again, now for
 * the client: pg_hba.conf is matched on its real address, and its method
 * talks to it directly.  Failure ends in the server's own FATAL to the
 * client (during authentication every ERROR is FATAL: no PG_exception_stack
 * yet, so nothing longjmps through Rust).  Returns false when the socket has
 * no peer address.
 */
bool
ng_server_authenticate(void)
{
	struct sockaddr_storage peer;
	socklen_t	len = sizeof(peer);

	if (getpeername(MyProcPort->sock, (struct sockaddr *) &peer, &len) != 0 ||
		len > sizeof(MyProcPort->raddr.addr))
		return false;
	ng_set_client_addr(&peer, len, NULL, 0);
#if PG_VERSION_NUM >= 160000
	if (MyClientConnectionInfo.authn_id)
		pfree((void *) MyClientConnectionInfo.authn_id);
	MyClientConnectionInfo.authn_id = NULL;
	MyClientConnectionInfo.auth_method = 0;
#else
	if (MyProcPort->authn_id)
		pfree((void *) MyProcPort->authn_id);
	MyProcPort->authn_id = NULL;
#endif
	/*
	 * This runs inside the login's own ClientAuthentication(): InitPostgres()
	 * makes SYSTEM_USER from the identity set here afterwards.
	 */
	ClientAuthentication(MyProcPort);
	return true;
}

/* ------------------------------------------------------------------------
 * Pooler: the server's own pg_hba.conf and pg_authid.
 * ------------------------------------------------------------------------ */

/*
 * hba.c remembers the postmaster's parsed_hba_context and
 * parsed_ident_context (both ALLOCSET_SMALL_SIZES) and deletes them on the
 * next load_hba()/load_ident() (the agent calls both on reload, only when
 * the fork handler kept the contexts alive, ng_keep_parsed_auth_files_in_child();
 * load_hba() at start too where it did not).  In a background worker the
 * handler did not run in, those contexts died
 * with PostmasterContext at worker start and their headers sit on the
 * small-context freelist (mcxt/aset.c keeps up to MAX_FREE_CONTEXTS = 100),
 * so the next small context created reuses one: on PostgreSQL 18 the pgstat
 * contexts the worker creates while it connects, which load_hba() then
 * deleted under hba_getauthmethod (SIGSEGV at the first login).  Must run
 * first thing in the pooler, before it connects: drain that freelist into
 * contexts nobody touches again, so the stale pointers name live, empty
 * contexts whose deletion is harmless (at most 100 x 1 kB).
 */
void
ng_pooler_guard_stale_hba_contexts(void)
{
	for (int i = 0; i < 100; i++)
		(void) AllocSetContextCreate(TopMemoryContext, "nextgres hba guard",
									 ALLOCSET_SMALL_SIZES);
}

/*
 * Runs one of hba.c's loaders (load_hba, load_ident) in the pooler: under our
 * stand-in PostmasterContext, where they allocate; with a pending SIGINT
 * cleared and cancel held off (SIGINT means nothing to the pooler, and the
 * regex code and catalog access check for it); an ERROR captured into err.
 * A file that does not load keeps the previous lines and the server LOGs
 * why: false then, err F0000 `failed` unless an error was raised.
 */
static bool
ng_load_conf(bool (*load) (void), const char *failed, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	uint32		holdoff = QueryCancelHoldoffCount;
	volatile bool ok = false;

	if (PostmasterContext == NULL)
		PostmasterContext = AllocSetContextCreate(TopMemoryContext, "nextgres hba",
												  ALLOCSET_DEFAULT_SIZES);
	QueryCancelPending = false;
	HOLD_CANCEL_INTERRUPTS();
	PG_TRY();
	{
		ok = load();
		if (!ok)
		{
			strlcpy(err->sqlstate, "F0000", sizeof(err->sqlstate));
			strlcpy(err->message, failed, sizeof(err->message));
		}
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		ok = false;
	}
	PG_END_TRY();
	QueryCancelHoldoffCount = holdoff;
	QueryCancelPending = false;
	MemoryContextSwitchTo(cxt);
	return ok;
}

/*
 * The server's load_hba() in the agent, on SIGHUP (and at start where the
 * fork handler did not keep the postmaster's lines).  PostmasterContext is
 * gone in a background worker (deleted at worker start), so keep our own
 * and reload into it; load_hba() allocates there.
 */
bool
ng_load_hba(NgError *err)
{
	/* pg_ident.conf: ng_load_ident(), on reload only. */
	return ng_load_conf(load_hba, "could not load pg_hba.conf", err);
}

/*
 * pg_ident.conf in the pooler.  hba.c keeps the parsed file in two statics,
 * parsed_ident_lines and parsed_ident_context, a child of PostmasterContext
 * named "ident parser context" (15..18), and load_ident() frees the old ones
 * before installing new ones: on 15 it walks the old lines to pg_regfree()
 * the regex ones (their memory came from malloc()), on 16+ it deletes the
 * old context (regexes are palloc'd there).  A background worker deletes
 * PostmasterContext at start (bgworker.c / postmaster.c), so in the pooler
 * both statics point into freed memory: check_usermap() read freed lines,
 * and the first load_ident() pg_regfree()d garbage (SIGSEGV at pooler start
 * on 15 with a regex line).
 *
 * So the parsed file outlives PostmasterContext in every child the
 * postmaster forks: a fork handler, run in the child before fork() returns
 * (before the child deletes PostmasterContext), moves the postmaster's
 * current "ident parser context" under TopMemoryContext.  The statics then
 * stay valid: the pooler starts with exactly the lines the postmaster
 * loaded (as a backend forked at the same moment would), and its own
 * load_ident() on SIGHUP frees them as hba.c expects.  The cost: every
 * process the postmaster forks keeps its copy of the parsed pg_ident.conf
 * instead of freeing it with PostmasterContext: on 16+ about 5 kB per regex
 * line (the compiled regex's colormap, palloc'd in that context), a few
 * hundred bytes per plain line, mostly shared copy-on-write with the
 * postmaster since nobody writes it; on 15 the compiled regexes were kept
 * anyway (malloc()ed, never freed in children).
 *
 * The name and parent are hba.c's of 15..18 (load_ident()); a later major
 * version must be rechecked before it builds.  At run time the pooler uses
 * maps only if this handler ran in its process (ng_ident_kept()), so a child
 * forked some other way refuses map= instead of reading freed lines.
 */
#if PG_VERSION_NUM >= 190000
#error "recheck hba.c's hba and ident parser contexts (ng_keep_parsed_auth_files_in_child)"
#endif

/*
 * Set in a postmaster child by ng_keep_parsed_auth_files_in_child(): hba.c's
 * parsed_ident_lines/parsed_ident_context are valid in this process, either
 * because their context was moved under TopMemoryContext, or because the
 * postmaster had none yet (forked before its first load_ident(), or that
 * load failed): then both statics are NULL/NIL, which check_usermap()
 * (no line matches) and load_ident() (nothing to free) handle.  False in a
 * process the handler did not run in: hba.c's pg_ident.conf state must not
 * be touched there.
 */
static bool ng_ident_is_kept = false;

/*
 * The same for pg_hba.conf: hba.c's parsed_hba_lines/parsed_hba_context
 * ("hba parser context", a child of PostmasterContext in load_hba(), 15..18)
 * are the rules the postmaster has loaded, moved under TopMemoryContext by
 * the same handler.  The agent authenticates with exactly those until its
 * first SIGHUP, as a backend forked at that moment would; it must not read
 * pg_hba.conf from disk at start, where an edit not yet reloaded (or the
 * postmaster's crash restart, which keeps its parsed rules) would make the
 * pooler port follow rules the server does not.  The cost is the one above,
 * for every child: its copy of the parsed pg_hba.conf stays instead of going
 * with PostmasterContext.
 */
static bool ng_hba_is_kept = false;

static void
ng_keep_parsed_auth_files_in_child(void)
{
	MemoryContext c;
	MemoryContext next;

	/* Only in a child of the postmaster (MyProcPid is still the parent's). */
	if (!IsPostmasterEnvironment || IsUnderPostmaster ||
		MyProcPid != PostmasterPid || PostmasterContext == NULL)
		return;
	for (c = PostmasterContext->firstchild; c != NULL; c = next)
	{
		/* Reparenting unlinks c from this list: take the next one first. */
		next = c->nextchild;
		if (strcmp(c->name, "ident parser context") == 0 ||
			strcmp(c->name, "hba parser context") == 0)
			MemoryContextSetParent(c, TopMemoryContext);
	}
	/* Moved, or nothing to keep (hba.c's statics are empty then). */
	ng_ident_is_kept = true;
	ng_hba_is_kept = true;
}

/*
 * Pooler: may hba.c's pg_ident.conf state (check_usermap(), load_ident())
 * be used in this process?  See ng_ident_is_kept.
 */
bool
ng_ident_kept(void)
{
	return ng_ident_is_kept;
}

/*
 * Agent: are hba.c's pg_hba.conf lines the postmaster's, valid in this
 * process (see ng_hba_is_kept)?  False: load_hba() must fill them.
 */
bool
ng_hba_kept(void)
{
	return ng_hba_is_kept;
}

/* Postmaster, _PG_init: install the fork handler above.  False on failure. */
bool
ng_install_auth_file_keeper(void)
{
	return pthread_atfork(NULL, NULL, ng_keep_parsed_auth_files_in_child) == 0;
}

/*
 * The server's load_ident() (hba.c) in the pooler, on SIGHUP after
 * ng_load_hba(): it allocates under PostmasterContext (our stand-in, see
 * ng_load_hba()).  A file that does not load keeps the previous lines, and
 * the server LOGs why, as in the postmaster; false then (err filled when
 * an error was raised, else F0000 "could not load pg_ident.conf").
 * Callers check ng_ident_kept() first.
 *
 * A SIGINT (pg_cancel_backend() of the pooler) means nothing to the pooler:
 * a pending one is cleared first, else the regex library (regc_pg_locale.c
 * rcancelrequested() reads QueryCancelPending) fails with REG_CANCEL, and
 * cancel is held off for CHECK_FOR_INTERRUPTS() (57014) meanwhile.  One
 * arriving during a regex compile still fails that compile (the file is
 * not loaded, LOGged, previous lines kept): rare, and the next reload
 * loads it.
 *
 * Leak, accepted: if load_ident() raises an ERROR (out of memory; it LOGs
 * and returns false for a bad file) the lines tokenized and the new context
 * it was filling stay allocated under our PostmasterContext, never freed;
 * the previous lines stay in use.  A few kB per such failure, which should
 * not repeat.
 */
bool
ng_load_ident(NgError *err)
{
	return ng_load_conf(load_ident, "could not load pg_ident.conf", err);
}

typedef struct NgLoginInfo
{
	int			hba_method;
	int			hba_line;
	char		hba_method_name[32];
	char		hba_file[1024];
	bool		role_exists;
	Oid			role_oid;
	bool		role_canlogin;
	bool		role_super;
	int			role_connlimit;
	bool		has_secret;
	char		secret[1024];
	char		secret_detail[256];
	bool		db_exists;
	Oid			db_oid;
	bool		db_allowconn;
	int			db_connlimit;
	bool		db_can_connect;
	int			hba_clientcert; /* 0 off, 1 verify-ca, 2 verify-full */
	bool		hba_clientname_dn;	/* clientname=DN (else CN) */
	char		hba_usermap[256];	/* map=, empty without one */
	bool		hba_usermap_too_long;	/* map= did not fit: refuse */
	/* auth.c auth_failed()'s DETAIL naming the matched line, in its words */
	char		hba_match_detail[1536];
} NgLoginInfo;

static int
map_auth_method(UserAuth m)
{
	switch (m)
	{
		case uaImplicitReject:
			return NG_AUTH_IMPLICIT_REJECT;
		case uaReject:
			return NG_AUTH_REJECT;
		case uaTrust:
			return NG_AUTH_TRUST;
		case uaPassword:
			return NG_AUTH_PASSWORD;
		case uaMD5:
			return NG_AUTH_MD5;
		case uaSCRAM:
			return NG_AUTH_SCRAM;
		case uaCert:
			return NG_AUTH_CERT;
		default:
			return NG_AUTH_OTHER;
	}
}

/*
 * Everything the pooler needs to decide a login, in one short transaction:
 * the hba line that matches the client's real address, the role (with its
 * secret, VALID UNTIL honoured) and the database with CONNECT privilege.
 */
bool
ng_login_lookup(const char *database, const char *user,
				const struct sockaddr_storage *addr, socklen_t salen,
				bool ssl_in_use, int replication, NgLoginInfo *out, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	/* The pooler's own values (false: it is no walsender), restored below. */
	bool		was_walsender = am_walsender;
	bool		was_db_walsender = am_db_walsender;
	volatile bool ok = true;

	memset(out, 0, sizeof(*out));
	PG_TRY();
	{
		Port	   *port;
		HeapTuple	tup;
		const char *logdetail = NULL;
		char	   *secret;

		StartTransactionCommand();

		port = (Port *) palloc0(sizeof(Port));
		port->sock = PGINVALID_SOCKET;
		memcpy(&port->raddr.addr, addr, salen);
		port->raddr.salen = salen;
		port->database_name = pstrdup(database);
		port->user_name = pstrdup(user);
		/* hostssl / hostnossl lines match on this (hba.c check_hba()) */
		port->ssl_in_use = ssl_in_use;

		/*
		 * hba.c check_db() decides replication connections from the
		 * walsender globals, as postmaster's ProcessStartupPacket() set them
		 * for a direct connection: 1 (replication=true) matches only
		 * "replication" lines, 2 (replication=database) only database lines.
		 * Set for the lookup alone and restored (also on error, below).
		 */
		am_walsender = replication != 0;
		am_db_walsender = replication == 2;
		hba_getauthmethod(port);
		am_walsender = was_walsender;
		am_db_walsender = was_db_walsender;
		out->hba_clientcert = port->hba->clientcert == clientCertOff ? 0 :
			port->hba->clientcert == clientCertCA ? 1 : 2;
		out->hba_clientname_dn = port->hba->clientcertname == clientCertDN;
		if (port->hba->usermap &&
			strlcpy(out->hba_usermap, port->hba->usermap, sizeof(out->hba_usermap)) >= sizeof(out->hba_usermap))
			out->hba_usermap_too_long = true;
		out->hba_method = map_auth_method(port->hba->auth_method);
		out->hba_line = port->hba->linenumber;
		strlcpy(out->hba_method_name, hba_authname(port->hba->auth_method),
				sizeof(out->hba_method_name));
		strlcpy(out->hba_file, hba_line_file(port->hba), sizeof(out->hba_file));
#if PG_VERSION_NUM >= 160000
		snprintf(out->hba_match_detail, sizeof(out->hba_match_detail),
				 "Connection matched file \"%s\" line %d: \"%s\"",
				 hba_line_file(port->hba), port->hba->linenumber,
				 port->hba->rawline ? port->hba->rawline : "");
#else
		snprintf(out->hba_match_detail, sizeof(out->hba_match_detail),
				 "Connection matched pg_hba.conf line %d: \"%s\"",
				 port->hba->linenumber, port->hba->rawline ? port->hba->rawline : "");
#endif

		tup = SearchSysCache1(AUTHNAME, PointerGetDatum(user));
		if (HeapTupleIsValid(tup))
		{
			Form_pg_authid r = (Form_pg_authid) GETSTRUCT(tup);

			out->role_exists = true;
			out->role_oid = r->oid;
			out->role_canlogin = r->rolcanlogin;
			out->role_super = r->rolsuper;
			out->role_connlimit = r->rolconnlimit;
			ReleaseSysCache(tup);
		}
		secret = get_role_password(user, &logdetail);
		if (secret)
		{
			out->has_secret = true;
			strlcpy(out->secret, secret, sizeof(out->secret));
			explicit_bzero(secret, strlen(secret));
			pfree(secret);
		}
		else if (logdetail)
			strlcpy(out->secret_detail, logdetail, sizeof(out->secret_detail));

		/*
		 * A heap scan, not get_database_oid(): its index scan needs pg_class,
		 * which a process attached to no database cannot read until some
		 * backend has written the shared relcache init file.
		 */
		{
			Relation	rel = table_open(DatabaseRelationId, AccessShareLock);
			TableScanDesc scan = table_beginscan_catalog(rel, 0, NULL);

			while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
			{
				Form_pg_database d = (Form_pg_database) GETSTRUCT(tup);

				if (strcmp(NameStr(d->datname), database) != 0)
					continue;
				out->db_exists = true;
				out->db_oid = d->oid;
				out->db_allowconn = d->datallowconn;
				out->db_connlimit = d->datconnlimit;
				break;
			}
			table_endscan(scan);
			table_close(rel, AccessShareLock);
		}
		if (out->db_exists)
			out->db_can_connect = out->role_exists &&
				(out->role_super || database_connect_allowed(out->db_oid, out->role_oid));
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		am_walsender = was_walsender;
		am_db_walsender = was_db_walsender;
		ng_capture_error(cxt, err);
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return ok;
}

/*
 * The server's check_usermap() (hba.c): is `system_user` (a client
 * certificate's CN or DN) allowed to log in as `pg_user` under `usermap`
 * (empty: the names must be equal), with the pg_ident.conf the postmaster
 * had loaded when it forked the pooler, or ng_load_ident() loaded since.
 * Case-sensitive, as auth.c CheckCertAuth() calls it. In a
 * transaction: a "+role" or "@file" line looks up role membership. The
 * server LOGs the reason for a refusal itself. Returns 1 allowed,
 * 0 refused, -1 on error (err filled).  Callers check ng_ident_kept() first.
 * A pending SIGINT is cleared and cancel held off, as in ng_load_ident():
 * else pg_regexec() returns REG_CANCEL (a refusal) and catalog access raises
 * 57014.
 */
int
ng_check_usermap(const char *usermap, const char *pg_user, const char *system_user, NgError *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	uint32		holdoff = QueryCancelHoldoffCount;
	volatile int result = 0;

	QueryCancelPending = false; /* SIGINT means nothing to the pooler */
	HOLD_CANCEL_INTERRUPTS();
	PG_TRY();
	{
		StartTransactionCommand();
		result = check_usermap(usermap[0] ? usermap : NULL, pg_user, system_user, false) == STATUS_OK ? 1 : 0;
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ng_capture_error(cxt, err);
		AbortCurrentTransaction();
		result = -1;
	}
	PG_END_TRY();
	QueryCancelHoldoffCount = holdoff;
	QueryCancelPending = false;
	MemoryContextSwitchTo(cxt);
	return result;
}

/* Serve procsignal barriers and die/reload requests in the pooler's loop. */
void
ng_pooler_check_interrupts(void)
{
	ResetLatch(MyLatch);
	QueryCancelPending = false; /* SIGINT means nothing to the pooler */
	CHECK_FOR_INTERRUPTS();
}

/* AddinShmemInitLock is a macro over MainLWLockArray; expose it as calls. */
void
ng_addin_shmem_lock(bool acquire)
{
	if (acquire)
		LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	else
		LWLockRelease(AddinShmemInitLock);
}

/*
 * A process attached to no database never runs RelationCacheInitializePhase3,
 * so shared-catalog index entries loaded from global/pg_internal.init stay
 * incomplete ("missing support function ... pg_database_oid_index"), yet
 * loading that file marks criticalSharedRelcachesBuilt and makes the catalog
 * caches use those indexes.  Clearing the flag puts the pooler back in the
 * state of a server whose init file does not exist yet: the authentication
 * caches (pg_authid, pg_auth_members, pg_database) use heap scans, which are
 * correct and, for these small shared catalogs, cheap.
 */
void
ng_pooler_catalog_heap_scans(void)
{
	criticalSharedRelcachesBuilt = false;
}

/*
 * InitPostgres() returns before initialize_acl() (postinit.c) in a worker
 * attached to no database, so acl.c's role-membership cache, which decides
 * hba `+group` and `samerole` lines, pg_ident `+group` entries and a CONNECT
 * privilege held through a group, never had its invalidation callbacks: after
 * REVOKE grp FROM r the agent still admitted r (hunt11c 1).  Registers them,
 * as a backend has them; once, right after the connection, in a transaction
 * (it hashes a pg_database key, which may open that catalog's cache).
 */
void
ng_agent_acl_init(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		StartTransactionCommand();
		initialize_acl();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		/* Out of memory at most: the agent ends (and restarts) rather than
		 * unwind through Rust frames. */
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		edata->elevel = FATAL;
		ThrowErrorData(edata);
	}
	PG_END_TRY();
}

/* ------------------------------------------------------------------------
 * The pooler process (pooler/agent.rs): forked by the agent (the nextgres
 * background worker), not by the postmaster, so that a pooler killed with
 * kill -9 is not a crashed server child (postmaster.c
 * CleanupBackgroundWorker -> HandleChildCrash) and ends no session.
 * ------------------------------------------------------------------------ */

/*
 * First thing in the pooler process after fork(), before any other server
 * call.  It inherited the agent's memory, so its globals still name the
 * agent's PGPROC, latch and backend status entry: two processes on one
 * PGPROC would corrupt the server.
 *
 * - on_exit_reset() (ipc.c): proc_exit() in this process runs none of the
 *   agent's exit callbacks (ProcKill, the lock and pgstat cleanups) and
 *   detaches no DSM segment from the control segment, as the postmaster's
 *   children do after fork (postmaster.c, fork_process callers).
 * - MyProcPid: log lines name this process, and pqsignal's wrapper handler
 *   (17+) checks it.
 * - MyLatch back to the process-local latch (miscinit.c
 *   SwitchBackToLocalLatch), MyProc and MyBEEntry cleared: code that
 *   checks them (elog.c's log_line_prefix, pgstat_report_appname() from a
 *   GUC assign hook) finds no shared entry; code that would use them
 *   without checking must not run here (src/pooler/agent.rs lists what
 *   runs where).
 * - The process title: "postgres: nextgres pooler", and the backend type
 *   its log lines show (%b of log_line_prefix, elog.c: a background
 *   worker's bgw_type, a copy in this process's memory).
 */
void
ng_pooler_child_init(void)
{
	on_exit_reset();
	/*
	 * Interrupt flags copied from the agent belong to the agent: served here
	 * they would absorb its ProcSignal barriers or raise its cancel. The
	 * pooler has its own signal handlers and never serves PostgreSQL
	 * interrupts (elog's CHECK_FOR_INTERRUPTS included).
	 */
	InterruptPending = false;
	QueryCancelPending = false;
	ProcDiePending = false;
	ProcSignalBarrierPending = false;
	LogMemoryContextPending = false;
	HOLD_INTERRUPTS();
	/* Wait events must not be written into the agent's PGPROC. */
	pgstat_reset_wait_event_storage();
	/* As fork_process() does for postmaster children: a fresh random state. */
	pg_strong_random_init();
	/* While MyProcPid still owns the local latch: its SetLatch stays local. */
	SwitchBackToLocalLatch();
	MyProcPid = getpid();
	MyProc = NULL;
	MyBEEntry = NULL;
	init_ps_display("nextgres pooler");
	if (MyBgworkerEntry != NULL)
		strlcpy(MyBgworkerEntry->bgw_type, "nextgres pooler", BGW_MAXLEN);
}

/*
 * The pipe end that turns readable when the postmaster dies
 * (postmaster_alive_fds[POSTMASTER_FD_WATCH], inherited by every child):
 * the pooler process watches it in its own epoll, as WaitEventSet's
 * WL_POSTMASTER_DEATH does.
 */
int
ng_postmaster_watch_fd(void)
{
	return postmaster_alive_fds[POSTMASTER_FD_WATCH];
}

/*
 * How much a saturated pool's dispatch costs, without PostgreSQL: the kernel
 * mechanics of two ways to give a waiting client's next request to one of a
 * pool's backends (issue 15; BENCHMARKS.md "Issue 15, third step").
 *
 *   pooler: today's nextgres path. A pooler process watches idle clients
 *           (EPOLLONESHOT), sends a ready one's descriptor with a small
 *           ATTACH (SCM_RIGHTS) to a free backend; the backend serves one
 *           request, writes RELEASED on its control socket and closes its
 *           copy; the pooler re-arms the client.
 *   shared: no process in the middle. The pool's idle clients sit in one
 *           epoll instance that every backend of the pool holds; a backend
 *           takes the next ready client itself (EPOLLONESHOT: exactly one
 *           backend gets it), serves it through its own descriptor of the
 *           client's socket (inherited here, as a backend would keep the
 *           sockets it served; with `pidfd`, fetched once per client and
 *           backend with pidfd_getfd(2) from the process that accepted it)
 *           and re-arms it with that descriptor (EPOLL_CTL_ADD the first
 *           time, EPOLL_CTL_MOD after), so the next request goes to
 *           whichever backend is free first.
 *
 * A driver process plays the clients as pgbench does: each sends a request
 * as soon as its previous answer arrives. Clients are socketpairs, requests
 * one byte. Prints requests/s, CPU per request of all processes, the
 * pooler's own, and a check that no ready client reached two backends.
 * Exit status: 0, 1 when a client reached two backends at once (or nothing
 * was served), 3 when pidfd_getfd(2) is refused here.
 *
 *   cc -O2 -o /tmp/dispatch tools/bench.d/dispatch.c
 *   /tmp/dispatch pooler 100 16 5; /tmp/dispatch shared 100 16 5
 *   /tmp/dispatch shared 100 16 5 pidfd
 *
 * Facts it relies on (Linux 5.6+), each checked by running it:
 *   - epoll registrations are keyed by (open file, descriptor number of the
 *     registering process): backends add their own, one per backend and
 *     client, all removed when the client's socket is finally closed;
 *     a one-shot registration that fired stays disarmed, so only the
 *     last re-armed one reports the client;
 *   - processes blocked in epoll_wait() on one instance are woken one per
 *     event (exclusive waiters), so a parked backend waits there directly;
 *     EPOLLEXCLUSIVE cannot nest an epoll instance in a backend's own set
 *     (EINVAL), which is why a parked backend cannot also watch its latch
 *     in the same wait: signals (procsignal, SIGTERM) interrupt it instead.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#define MAX_BACKENDS 256

struct shared
{
	volatile long served[MAX_BACKENDS];
	volatile long twice;		/* a ready client handed to two backends */
	volatile long fetched;		/* pidfd_getfd calls */
	volatile double pooler_cpu;
	volatile int stop;
};

static struct shared *sh;
static int	nclients,
			nbackends;
static int *srv,
		   *cli;
static volatile int *owner;		/* backend serving client i, or -1 */

static double
now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static double
cpu_seconds(int who)
{
	struct rusage r;

	getrusage(who, &r);
	return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 +
		r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static void
die(const char *what)
{
	perror(what);
	_exit(1);
}

/* One request: read it, answer it. False when the client is gone. */
static int
serve(int fd)
{
	char		buf[256];
	int			n = read(fd, buf, sizeof buf);

	if (n <= 0)
		return 0;
	return write(fd, buf, n) == n;
}

static void
claim(int i, int b)
{
	if (!__sync_bool_compare_and_swap(&owner[i], -1, b))
		__sync_fetch_and_add(&sh->twice, 1);
}

/* --- pooler: SCM_RIGHTS to a free backend, RELEASED back ---------------- */

static int
send_fd(int s, int fd, int i)
{
	char		c[CMSG_SPACE(sizeof(int))];
	struct iovec v = {&i, sizeof i};
	struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1, .msg_control = c, .msg_controllen = sizeof c};
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);

	h->cmsg_level = SOL_SOCKET;
	h->cmsg_type = SCM_RIGHTS;
	h->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(h), &fd, sizeof fd);
	return sendmsg(s, &m, 0);
}

static int
recv_fd(int s, int *i, int *fd)
{
	char		c[CMSG_SPACE(sizeof(int))];
	struct iovec v = {i, sizeof *i};
	struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1, .msg_control = c, .msg_controllen = sizeof c};
	int			n = recvmsg(s, &m, 0);
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);

	*fd = -1;
	if (h && h->cmsg_type == SCM_RIGHTS)
		memcpy(fd, CMSG_DATA(h), sizeof(int));
	return n;
}

static void
pooler_backend(int b, int control)
{
	int			i,
				fd;
	long		served = 0;

	while (!sh->stop && recv_fd(control, &i, &fd) > 0)
	{
		claim(i, b);
		sh->served[b] = served += serve(fd);
		owner[i] = -1;
		close(fd);
		if (write(control, &i, sizeof i) != sizeof i)	/* RELEASED */
			break;
	}
	sh->served[b] = served;
	_exit(0);
}

static void
pooler(const int *control)
{
	int			ep = epoll_create1(0);
	int		   *free_backends = malloc(nbackends * sizeof(int));
	int		   *queue = malloc(nclients * sizeof(int));
	int			nfree = 0;
	long		head = 0,
				tail = 0;
	struct epoll_event evs[64];

	for (int i = 0; i < nclients; i++)
	{
		struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = i};

		if (epoll_ctl(ep, EPOLL_CTL_ADD, srv[i], &ev))
			die("epoll_ctl");
	}
	for (int b = 0; b < nbackends; b++)
	{
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = nclients + b};

		epoll_ctl(ep, EPOLL_CTL_ADD, control[b], &ev);
		free_backends[nfree++] = b;
	}
	while (!sh->stop)
	{
		int			n = epoll_wait(ep, evs, 64, 100);

		for (int j = 0; j < n; j++)
		{
			long		x = evs[j].data.u64;
			int			i;

			if (x < nclients)
				queue[tail++ % nclients] = x;	/* ready: wait for a backend */
			else if (read(control[x - nclients], &i, sizeof i) == sizeof i)
			{
				struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = i};

				epoll_ctl(ep, EPOLL_CTL_MOD, srv[i], &ev);	/* idle again */
				free_backends[nfree++] = x - nclients;
			}
		}
		while (nfree > 0 && head < tail)
		{
			int			i = queue[head++ % nclients];

			send_fd(control[free_backends[--nfree]], srv[i], i);
		}
	}
	sh->pooler_cpu = cpu_seconds(RUSAGE_SELF);
	_exit(0);
}

/* --- shared: backends take ready clients from one epoll instance -------- */

static void
shared_backend(int b, int ep, pid_t acceptor, int use_pidfd)
{
	int			pidfd = -1;
	int		   *mine = malloc(nclients * sizeof(int));
	char	   *armed = calloc(nclients, 1);
	long		served = 0,
				fetched = 0;

	if (use_pidfd && (pidfd = syscall(SYS_pidfd_open, acceptor, 0)) < 0)
	{
		perror("pidfd_open");
		_exit(3);
	}
	for (int i = 0; i < nclients; i++)
		mine[i] = use_pidfd ? -1 : srv[i];	/* inherited: the kept sockets */
	while (!sh->stop)
	{
		struct epoll_event ev;
		struct epoll_event again;
		int			i;

		if (epoll_wait(ep, &ev, 1, 100) <= 0)
			continue;
		i = ev.data.u64;
		if (mine[i] < 0)
		{
			if ((mine[i] = syscall(SYS_pidfd_getfd, pidfd, srv[i], 0)) < 0)
			{
				perror("pidfd_getfd");
				_exit(3);		/* not permitted or not there: says nothing */
			}
			fetched++;
		}
		claim(i, b);
		if (!serve(mine[i]))
		{
			owner[i] = -1;
			continue;
		}
		sh->served[b] = ++served;
		owner[i] = -1;
		again.events = EPOLLIN | EPOLLONESHOT;
		again.data.u64 = i;
		/*
		 * The key is (file, descriptor number): another backend holding the
		 * client under the same number shares this registration (EEXIST).
		 */
		if (!armed[i] && epoll_ctl(ep, EPOLL_CTL_ADD, mine[i], &again) == 0)
			armed[i] = 1;
		else if (armed[i] || errno == EEXIST)
		{
			if (epoll_ctl(ep, EPOLL_CTL_MOD, mine[i], &again))
				die("epoll_ctl MOD");
			armed[i] = 1;
		}
		else
			die("epoll_ctl ADD");
	}
	sh->served[b] = served;
	__sync_fetch_and_add(&sh->fetched, fetched);
	_exit(0);
}

/* --- the clients -------------------------------------------------------- */

static void
driver(void)
{
	int			ep = epoll_create1(0);
	struct epoll_event evs[64];
	char		buf[256];

	for (int i = 0; i < nclients; i++)
	{
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = i};

		epoll_ctl(ep, EPOLL_CTL_ADD, cli[i], &ev);
		if (write(cli[i], "Q", 1) != 1)
			die("write");
	}
	while (!sh->stop)
	{
		int			n = epoll_wait(ep, evs, 64, 100);

		for (int j = 0; j < n; j++)
		{
			int			i = evs[j].data.u64;

			if (read(cli[i], buf, sizeof buf) > 0 && write(cli[i], "Q", 1) != 1)
				die("write");
		}
	}
	_exit(0);
}

int
main(int argc, char **argv)
{
	int			use_pooler,
				use_pidfd;
	double		seconds,
				t0,
				t1,
				cpu;
	long		total = 0;
	int		   *control;
	int			ep = -1;
	int			status,
				unavailable = 0;

	if (argc < 5 || (strcmp(argv[1], "pooler") && strcmp(argv[1], "shared")))
	{
		fprintf(stderr, "usage: %s pooler|shared CLIENTS BACKENDS SECONDS [pidfd]\n", argv[0]);
		return 2;
	}
	use_pooler = strcmp(argv[1], "pooler") == 0;
	nclients = atoi(argv[2]);
	nbackends = atoi(argv[3]);
	seconds = atof(argv[4]);
	use_pidfd = argc > 5 && strcmp(argv[5], "pidfd") == 0;
	/* Every process: writes to a socket that the end of the run shut down. */
	signal(SIGPIPE, SIG_IGN);
	if (nclients < 1 || nbackends < 1 || nbackends > MAX_BACKENDS)
		return 2;
	sh = mmap(0, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	owner = mmap(0, nclients * sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	srv = malloc(nclients * sizeof(int));
	cli = malloc(nclients * sizeof(int));
	control = malloc(nbackends * sizeof(int));
	for (int i = 0; i < nclients; i++)
	{
		int			sv[2];

		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv))
			die("socketpair (raise ulimit -n)");
		srv[i] = sv[0];
		cli[i] = sv[1];
		owner[i] = -1;
	}
	if (!use_pooler)
	{
		ep = epoll_create1(0);
		for (int i = 0; i < nclients; i++)
		{
			struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = i};

			if (epoll_ctl(ep, EPOLL_CTL_ADD, srv[i], &ev))
				die("epoll_ctl");
		}
	}
	for (int b = 0; b < nbackends; b++)
	{
		int			sv[2];

		if (use_pooler && socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
			die("socketpair");
		if (fork() == 0)
		{
			if (use_pooler)
				pooler_backend(b, sv[1]);
			shared_backend(b, ep, getppid(), use_pidfd);
		}
		if (use_pooler)
		{
			close(sv[1]);
			control[b] = sv[0];
		}
	}
	if (fork() == 0)
		driver();
	if (use_pooler && fork() == 0)
		pooler(control);
	t0 = now();
	usleep((useconds_t) (seconds * 1e6));
	sh->stop = 1;
	t1 = now();
	for (int b = 0; use_pooler && b < nbackends; b++)
		shutdown(control[b], SHUT_RDWR);
	while (wait(&status) > 0)
		if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
			unavailable = 1;
	cpu = cpu_seconds(RUSAGE_CHILDREN);
	for (int b = 0; b < nbackends; b++)
		total += sh->served[b];
	if (unavailable)
	{
		fprintf(stderr, "pidfd_getfd is not available here\n");
		return 3;
	}
	if (total == 0)
	{
		fprintf(stderr, "%s: no request was served\n", argv[1]);
		return 1;
	}
	printf("%s%s, %d clients, %d backends: %.0f requests/s; CPU per request: %.2f us all processes, %.2f us pooler; "
		   "handed to two backends at once: %ld; pidfd_getfd calls: %ld\n",
		   argv[1], use_pidfd ? " (pidfd)" : "", nclients, nbackends, total / (t1 - t0),
		   cpu * 1e6 / total, sh->pooler_cpu * 1e6 / total, sh->twice, sh->fetched);
	return sh->twice != 0;
}

/* The compiled UDP fast path: one listening socket, read a batch per wake-up (recvmmsg),
 * answer the fresh cache hits of the common shape here, send them as a batch (sendmmsg),
 * and hand every other datagram to the Python listener (UdpListener.datagram_received).
 *
 * The hit block mirrors QueryHandler.handle's fast parse and hit block line for line; the
 * wrapper (fastudp.py) holds the rules on when this runs at all. Anything this code is not
 * sure of before its first side effect (the rate limit call) goes to Python untouched, so
 * a datagram is answered by exactly one of the two paths.
 *
 * State of the handler (entries, used, clock, ACL memo, rate limit, counters) is read from
 * the handler's own attributes once per batch, never cached across batches: a test or a
 * reload that swaps one is seen at the next wake-up, as the Python path sees it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
/* Larger than any UDP payload (65527 over IPv6): a datagram is never cut. The buffer's
 * pages are committed only where datagrams land, so small queries touch one page each. */
#define SLOT 65536
#define HOSTS 64
#define MAX_RCODES 64
#define MIN_UDP_PAYLOAD 512
#define TYPE_OPT 41

/* Field indices of a raw cache entry (sidecar/dns/cache.py). */
enum { E_HDR, E_HDR_EDNS, E_BODY, E_OFFSETS, E_STORED, E_EXPIRES, E_AGE, E_RCODE,
       E_PREFETCH_AT, E_FIELDS };

enum { FALLBACK, ANSWERED, SILENT, FAILED };

static const unsigned char ONE_Q[8] = {0, 1, 0, 0, 0, 0, 0, 0};
static const unsigned char ONE_Q_OPT[8] = {0, 1, 0, 0, 0, 0, 0, 1};

/* Identity of the builtins the handler binds (dict.get, set.add): when its bound methods
 * are these, the batch reads the dict and set directly instead of calling through. */
static PyCFunction dict_get_meth, set_add_meth;
static PyObject *monotonic; /* time.monotonic: read without a Python call when it is the clock */

static PyObject *s_get, *s_touch, *s_now, *s_acl_get, *s_ratelimit, *s_allow, *s_cache,
    *s_resolver, *s_rcodes, *s_max_udp_size, *s_hits, *s_truncated, *s_ratelimited,
    *s_received, *s_closing, *s_rendered_body, *s_prefetch, *s_error_received,
    *s_hit_failed, *s_datagram_received;

typedef struct {
    unsigned char key[20];
    unsigned char len;
    PyObject *host;
} HostSlot;

typedef struct {
    PyObject_HEAD
    int fd;
    int busy;
    int blocked;            /* the wrapper holds a send backlog: queue behind it */
    int batch;              /* datagrams read per wake-up, 1..BATCH */
    PyObject *listener;
    PyObject *handler;
    PyObject *opt_rr;       /* bytes: our OPT record */
    PyObject *on_blocked;   /* wrapper callback: list of (bytes, addr) the kernel refused */
    unsigned long long answered, passed, batches, datagrams;
    unsigned char *rbuf;
    struct mmsghdr rmsg[BATCH];
    struct iovec riov[BATCH];
    struct sockaddr_storage raddr[BATCH];
    struct mmsghdr smsg[BATCH];
    struct iovec siov[BATCH][4];
    unsigned char shdr[BATCH][12];
    PyObject *sref[BATCH];  /* the body each reply points into, held until sent */
    HostSlot hosts[HOSTS];
} FastUdp;

/* What one batch reads from the handler, and the counters it owes back. */
typedef struct {
    PyObject *get, *touch, *now, *acl_get, *ratelimit, *rl_allow, *cache, *resolver, *rcodes;
    PyObject *entries, *used, *verdicts; /* borrowed from the bound methods above */
    long max_udp;
    int mono;
    Py_ssize_t nrcodes;
    long hits, truncated, ratelimited, received;
    long rc[MAX_RCODES];
} Batch;

/* ------------------------------------------------------------------ small helpers */

static double
mono_now(void)
{
    /* time.monotonic()'s own conversion (_PyTime_AsSecondsDouble), so both read alike. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    if (ns % 1000000000LL == 0)
        return (double)(ns / 1000000000LL);
    return (double)ns / 1e9;
}

static int
as_double(PyObject *o, double *out)
{
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 1;
    }
    if (PyLong_CheckExact(o)) {
        *out = PyLong_AsDouble(o);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

/* The pending exception as one normalized object (traceback attached), cleared; NULL when
 * none. PyErr_GetRaisedException is 3.12+. */
static PyObject *
take_exc(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (t == NULL)
        return NULL;
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/* Set exc (stolen) as the pending exception again. */
static void
give_exc(PyObject *v)
{
    if (v == NULL)
        return;
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(v)), v, PyException_GetTraceback(v));
}

static int
add_attr(PyObject *obj, PyObject *name, long delta)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromLong(delta);
    if (d == NULL) {
        Py_DECREF(v);
        return -1;
    }
    PyObject *s = PyNumber_Add(v, d);
    Py_DECREF(v);
    Py_DECREF(d);
    if (s == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, s);
    Py_DECREF(s);
    return r;
}

/* The dict or set behind a bound builtin method such as entries.get, or NULL. */
static PyObject *
bound_self(PyObject *f, PyCFunction meth, PyTypeObject *type)
{
    if (f == NULL || !PyCFunction_Check(f))
        return NULL;
    PyCFunctionObject *cf = (PyCFunctionObject *)f;
    if (cf->m_ml->ml_meth != meth || cf->m_self == NULL || Py_TYPE(cf->m_self) != type)
        return NULL;
    return cf->m_self;
}

/* The client's address as the socket module spells it (host of the addr tuple). */
static PyObject *
host_of(FastUdp *self, int i)
{
    struct sockaddr_storage *sa = &self->raddr[i];
    unsigned char key[20];
    unsigned char len;
    if (sa->ss_family == AF_INET) {
        memcpy(key, &((struct sockaddr_in *)sa)->sin_addr, 4);
        len = 4;
    } else if (sa->ss_family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;
        memcpy(key, &s6->sin6_addr, 16);
        memcpy(key + 16, &s6->sin6_scope_id, 4);
        len = 20;
    } else {
        PyErr_SetString(PyExc_OSError, "unexpected address family");
        return NULL;
    }
    unsigned h = 0;
    for (int k = 0; k < len; k++)
        h = h * 31 + key[k];
    HostSlot *slot = &self->hosts[h % HOSTS];
    if (slot->host != NULL && slot->len == len && memcmp(slot->key, key, len) == 0) {
        Py_INCREF(slot->host);
        return slot->host;
    }
    char buf[NI_MAXHOST];
    if (len == 4) {
        if (inet_ntop(AF_INET, key, buf, sizeof(buf)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
    } else {
        /* getnameinfo, as CPython's makeipaddr: a scope id is written as "%ifname". */
        int err = getnameinfo((struct sockaddr *)sa, sizeof(struct sockaddr_in6), buf,
                              sizeof(buf), NULL, 0, NI_NUMERICHOST);
        if (err) {
            PyErr_SetString(PyExc_OSError, gai_strerror(err));
            return NULL;
        }
    }
    PyObject *host = PyUnicode_FromString(buf);
    if (host == NULL)
        return NULL;
    Py_XSETREF(slot->host, host);
    memcpy(slot->key, key, len);
    slot->len = len;
    Py_INCREF(host);
    return host;
}

/* The addr tuple asyncio hands datagram_received: (host, port) or (host, port, flow, scope). */
static PyObject *
addr_of(FastUdp *self, int i)
{
    PyObject *host = host_of(self, i);
    if (host == NULL)
        return NULL;
    struct sockaddr_storage *sa = &self->raddr[i];
    if (sa->ss_family == AF_INET)
        return Py_BuildValue("(Ni)", host, ntohs(((struct sockaddr_in *)sa)->sin_port));
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;
    return Py_BuildValue("(NiII)", host, ntohs(s6->sin6_port), ntohl(s6->sin6_flowinfo),
                         s6->sin6_scope_id);
}

/* ------------------------------------------------------------------ the batch's state */

static void
batch_release(Batch *b)
{
    Py_CLEAR(b->get);
    Py_CLEAR(b->touch);
    Py_CLEAR(b->now);
    Py_CLEAR(b->acl_get);
    Py_CLEAR(b->ratelimit);
    Py_CLEAR(b->rl_allow);
    Py_CLEAR(b->cache);
    Py_CLEAR(b->resolver);
    Py_CLEAR(b->rcodes);
}

/* 1: hits can be answered here; 0: not this batch (every datagram goes to Python). */
static int
batch_begin(FastUdp *self, Batch *b)
{
    memset(b, 0, sizeof(*b));
    PyObject *h = self->handler;
    if (!(b->get = PyObject_GetAttr(h, s_get)) || !(b->touch = PyObject_GetAttr(h, s_touch))
        || !(b->now = PyObject_GetAttr(h, s_now))
        || !(b->acl_get = PyObject_GetAttr(h, s_acl_get))
        || !(b->ratelimit = PyObject_GetAttr(h, s_ratelimit))
        || !(b->cache = PyObject_GetAttr(h, s_cache))
        || !(b->resolver = PyObject_GetAttr(h, s_resolver))
        || !(b->rcodes = PyObject_GetAttr(h, s_rcodes)))
        goto no;
    if (b->ratelimit != Py_None && !(b->rl_allow = PyObject_GetAttr(b->ratelimit, s_allow)))
        goto no;
    PyObject *mx = PyObject_GetAttr(h, s_max_udp_size);
    if (mx == NULL)
        goto no;
    b->max_udp = PyLong_Check(mx) ? PyLong_AsLong(mx) : -1;
    Py_DECREF(mx);
    if (b->max_udp == -1 && PyErr_Occurred())
        goto no;
    b->entries = bound_self(b->get, dict_get_meth, &PyDict_Type);
    b->used = bound_self(b->touch, set_add_meth, &PySet_Type);
    b->verdicts = bound_self(b->acl_get, dict_get_meth, &PyDict_Type);
    if (!b->entries || !b->used || !b->verdicts || !PyList_CheckExact(b->rcodes)
        || b->max_udp < 0 || !PyCallable_Check(b->now))
        goto no;
    b->nrcodes = PyList_GET_SIZE(b->rcodes);
    if (b->nrcodes > MAX_RCODES)
        b->nrcodes = MAX_RCODES;
    b->mono = b->now == monotonic;
    return 1;
no:
    PyErr_Clear();
    batch_release(b);
    return 0;
}

/* Pay the batch's counters into the handler, cache and listener (before any call into the
 * Python path, which reads and bumps the same counters, and at the end). */
static void
batch_flush(FastUdp *self, Batch *b)
{
    int bad = 0;
    if (b->hits)
        bad |= add_attr(b->cache, s_hits, b->hits) < 0;
    if (b->truncated)
        bad |= add_attr(self->handler, s_truncated, b->truncated) < 0;
    if (b->ratelimited)
        bad |= add_attr(self->handler, s_ratelimited, b->ratelimited) < 0;
    if (b->received)
        bad |= add_attr(self->listener, s_received, b->received) < 0;
    for (Py_ssize_t r = 0; r < b->nrcodes; r++) {
        if (!b->rc[r])
            continue;
        PyObject *old = PyList_GET_ITEM(b->rcodes, r);
        PyObject *d = PyLong_FromLong(b->rc[r]);
        PyObject *s = d ? PyNumber_Add(old, d) : NULL;
        Py_XDECREF(d);
        if (s == NULL)
            bad = 1;
        else
            PyList_SetItem(b->rcodes, r, s); /* steals s */
        b->rc[r] = 0;
    }
    b->hits = b->truncated = b->ratelimited = b->received = 0;
    if (bad)
        PyErr_WriteUnraisable(self->listener);
}

/* ------------------------------------------------------------------ one datagram */

/* Hand the pending exception to the listener (it counts and logs it, as for the Python
 * path's handler failures). */
static void
report_failure(FastUdp *self, PyObject *host)
{
    PyObject *exc = take_exc();
    PyObject *r = PyObject_CallMethodObjArgs(self->listener, s_hit_failed, exc ? exc : Py_None,
                                             host ? host : Py_None, NULL);
    Py_XDECREF(exc);
    if (r == NULL)
        PyErr_WriteUnraisable(self->listener);
    Py_XDECREF(r);
}

/* QueryHandler.handle's fast parse and hit block for datagram i. On ANSWERED the reply is in
 * send slot *nout. FAILED leaves the exception set and *hostp holding the host. */
static int
try_hit(FastUdp *self, Batch *b, int i, int *nout, PyObject **hostp)
{
    const unsigned char *d = self->rbuf + (size_t)i * SLOT;
    Py_ssize_t n = self->rmsg[i].msg_len;
    Py_ssize_t qend = 0;
    int edns = 0;
    long udp_size = MIN_UDP_PAYLOAD;

    if (n <= 17 || (d[2] & 0xF8))
        return FALLBACK;
    if (memcmp(d + 4, ONE_Q, 8) == 0) {
        qend = n;
    } else if (memcmp(d + 4, ONE_Q_OPT, 8) == 0) {
        /* Where an OPT without options starts, else (it carries options) after the name's
         * first zero byte: the handler's guess, kept identical. */
        Py_ssize_t o = n - 11;
        if (d[n - 2] || d[n - 1]) {
            const unsigned char *z = memchr(d + 12, 0, n - 12);
            o = (z ? z - d : -1) + 5;
        }
        if (o + 11 <= n) {
            unsigned root = d[o], rtype = (d[o + 1] << 8) | d[o + 2];
            unsigned size = (d[o + 3] << 8) | d[o + 4], version = d[o + 6];
            Py_ssize_t rdlen = (d[o + 9] << 8) | d[o + 10];
            if (!root && rtype == TYPE_OPT && !version && o + 11 + rdlen == n) {
                qend = o;
                edns = 1;
                udp_size = size;
            }
        }
    }
    if (qend <= 17)
        return FALLBACK;

    Py_ssize_t qlen = qend - 12;
    PyObject *key = PyBytes_FromStringAndSize(NULL, qlen);
    if (key == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    unsigned char *k = (unsigned char *)PyBytes_AS_STRING(key);
    for (Py_ssize_t j = 0; j < qlen; j++) {
        unsigned char c = d[12 + j];
        k[j] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    }
    PyObject *e = PyDict_GetItemWithError(b->entries, key); /* borrowed */
    if (e == NULL || !PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) < E_FIELDS) {
        PyErr_Clear();
        Py_DECREF(key);
        return FALLBACK;
    }
    PyObject *hdr = PyTuple_GET_ITEM(e, E_HDR), *hdr_edns = PyTuple_GET_ITEM(e, E_HDR_EDNS);
    PyObject *body = PyTuple_GET_ITEM(e, E_BODY), *e_age = PyTuple_GET_ITEM(e, E_AGE);
    PyObject *e_rcode = PyTuple_GET_ITEM(e, E_RCODE);
    double stored, expires, prefetch_at, now;
    long rcode;
    long long cur_age;
    int overflow;
    if (!PyBytes_CheckExact(hdr) || PyBytes_GET_SIZE(hdr) != 9 || !PyBytes_CheckExact(hdr_edns)
        || PyBytes_GET_SIZE(hdr_edns) != 9 || !PyBytes_CheckExact(body)
        || !PyLong_CheckExact(e_age) || !PyLong_CheckExact(e_rcode)
        || !as_double(PyTuple_GET_ITEM(e, E_STORED), &stored)
        || !as_double(PyTuple_GET_ITEM(e, E_EXPIRES), &expires)
        || !as_double(PyTuple_GET_ITEM(e, E_PREFETCH_AT), &prefetch_at)) {
        Py_DECREF(key);
        return FALLBACK;
    }
    rcode = PyLong_AsLongAndOverflow(e_rcode, &overflow);
    cur_age = PyLong_AsLongLongAndOverflow(e_age, &overflow);
    if (overflow || rcode < 0 || rcode >= b->nrcodes || PyErr_Occurred()) {
        PyErr_Clear();
        Py_DECREF(key);
        return FALLBACK;
    }
    Py_INCREF(e); /* calls below may replace it in the cache */
    PyObject *host = NULL;
    if (b->mono) {
        now = mono_now();
    } else {
        PyObject *t = PyObject_CallNoArgs(b->now);
        if (t == NULL)
            goto failed; /* the Python path raises here too: counted as a handler failure */
        int ok = as_double(t, &now);
        Py_DECREF(t);
        if (!ok)
            goto fallback;
    }
    if (!(now < expires))
        goto fallback;
    host = host_of(self, i);
    if (host == NULL) {
        PyErr_Clear();
        goto fallback;
    }
    PyObject *verdict = PyDict_GetItemWithError(b->verdicts, host);
    if (verdict != Py_True) {
        /* False or not memoized: the full parse judges it (REFUSED, or a check). */
        PyErr_Clear();
        goto fallback;
    }
    double span = now - stored;
    if (!(span > -9e15 && span < 9e15))
        goto fallback;
    long long age = (long long)span; /* int(): toward zero */

    /* From here on the datagram is ours. */
    if (b->rl_allow != NULL) {
        PyObject *r = PyObject_CallOneArg(b->rl_allow, host);
        if (r == NULL)
            goto failed;
        int ok = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (ok < 0)
            goto failed;
        if (!ok) {
            b->ratelimited++;
            Py_DECREF(host);
            Py_DECREF(key);
            Py_DECREF(e);
            return SILENT;
        }
    }
    if (PySet_Add(b->used, key) < 0)
        goto failed;
    b->hits++;
    if (age == cur_age) {
        Py_INCREF(body);
    } else {
        PyObject *a = PyLong_FromLongLong(age);
        body = a ? PyObject_CallMethodObjArgs(b->cache, s_rendered_body, key, e, a, NULL) : NULL;
        Py_XDECREF(a);
        if (body == NULL)
            goto failed;
        if (!PyBytes_CheckExact(body)) {
            Py_DECREF(body);
            PyErr_SetString(PyExc_TypeError, "rendered_body did not return bytes");
            goto failed;
        }
    }
    if (now > prefetch_at) {
        PyObject *r = PyObject_CallMethodObjArgs(b->resolver, s_prefetch, key, e, NULL);
        if (r == NULL) {
            Py_DECREF(body);
            goto failed;
        }
        Py_DECREF(r);
    }
    b->rc[rcode]++;

    /* The reply: ID, QR + RD, the entry's header byte 3 and counts, question, body, OPT. */
    int j = *nout;
    unsigned char *out = self->shdr[j];
    struct iovec *iov = self->siov[j];
    int rd = d[2] & 1;
    Py_ssize_t blen = PyBytes_GET_SIZE(body);
    Py_ssize_t optlen = edns ? PyBytes_GET_SIZE(self->opt_rr) : 0;
    Py_ssize_t size = 12 + qlen + blen + optlen;
    int niov;
    out[0] = d[0];
    out[1] = d[1];
    iov[0].iov_base = out;
    iov[0].iov_len = 12;
    iov[1].iov_base = (void *)(d + 12);
    iov[1].iov_len = qlen;
    if (size <= MIN_UDP_PAYLOAD || (size <= udp_size && size <= b->max_udp)) {
        out[2] = 0x80 | rd;
        memcpy(out + 3, PyBytes_AS_STRING(edns ? hdr_edns : hdr), 9);
        iov[2].iov_base = PyBytes_AS_STRING(body);
        iov[2].iov_len = blen;
        niov = 3;
        self->sref[j] = body; /* the iovec points into it until sent */
    } else {
        /* Too large for this client: header + question (+ OPT) with TC=1. */
        b->truncated++;
        out[2] = 0x82 | rd;
        out[3] = (unsigned char)PyBytes_AS_STRING(hdr)[0];
        memcpy(out + 4, edns ? ONE_Q_OPT : ONE_Q, 8);
        niov = 2;
        Py_DECREF(body);
    }
    if (edns) {
        iov[niov].iov_base = PyBytes_AS_STRING(self->opt_rr);
        iov[niov].iov_len = optlen;
        niov++;
    }
    struct msghdr *mh = &self->smsg[j].msg_hdr;
    memset(mh, 0, sizeof(*mh));
    mh->msg_name = &self->raddr[i];
    mh->msg_namelen = self->rmsg[i].msg_hdr.msg_namelen;
    mh->msg_iov = iov;
    mh->msg_iovlen = niov;
    (*nout)++;
    Py_DECREF(host);
    Py_DECREF(key);
    Py_DECREF(e);
    return ANSWERED;

fallback:
    Py_XDECREF(host);
    Py_DECREF(key);
    Py_DECREF(e);
    return FALLBACK;
failed:
    if (host == NULL) {
        PyObject *exc = take_exc();
        host = host_of(self, i);
        if (host == NULL)
            PyErr_Clear();
        give_exc(exc);
    }
    *hostp = host;
    Py_DECREF(key);
    Py_DECREF(e);
    return FAILED;
}

/* ------------------------------------------------------------------ sending */

/* One reply as (bytes, addr), for the wrapper's backlog. */
static PyObject *
materialize(FastUdp *self, int j)
{
    struct msghdr *mh = &self->smsg[j].msg_hdr;
    Py_ssize_t size = 0;
    for (size_t k = 0; k < mh->msg_iovlen; k++)
        size += mh->msg_iov[k].iov_len;
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(data);
    for (size_t k = 0; k < mh->msg_iovlen; k++) {
        memcpy(p, mh->msg_iov[k].iov_base, mh->msg_iov[k].iov_len);
        p += mh->msg_iov[k].iov_len;
    }
    int i = (int)((struct sockaddr_storage *)mh->msg_name - self->raddr);
    PyObject *addr = addr_of(self, i);
    if (addr == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    return Py_BuildValue("(NN)", data, addr);
}

static void
report_send_error(FastUdp *self, int err)
{
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    PyObject *exc = take_exc();
    PyObject *r = PyObject_CallMethodObjArgs(self->listener, s_error_received, exc, NULL);
    Py_DECREF(exc);
    if (r == NULL)
        PyErr_WriteUnraisable(self->listener);
    Py_XDECREF(r);
}

/* Replies from j on that the kernel would not take now go to the wrapper's backlog. */
static void
defer(FastUdp *self, int j, int nout)
{
    PyObject *list = PyList_New(0);
    for (; list != NULL && j < nout; j++) {
        PyObject *item = materialize(self, j);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(item);
    }
    PyObject *r = list ? PyObject_CallOneArg(self->on_blocked, list) : NULL;
    Py_XDECREF(list);
    if (r == NULL)
        PyErr_WriteUnraisable(self->listener);
    Py_XDECREF(r);
}

static void
send_batch(FastUdp *self, int nout)
{
    int j = 0;
    if (self->blocked && self->on_blocked != Py_None) {
        defer(self, 0, nout);
        return;
    }
    while (j < nout && self->fd >= 0) {
        int r = sendmmsg(self->fd, self->smsg + j, nout - j, MSG_DONTWAIT);
        if (r > 0) {
            j += r;
            continue;
        }
        int err = errno;
        if (r < 0 && err == EINTR)
            continue;
        if (r < 0 && (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS)
            && self->on_blocked != Py_None) {
            defer(self, j, nout);
            return;
        }
        /* This reply cannot be sent (its address, say): counted as the transport does. */
        report_send_error(self, r < 0 ? err : EIO);
        j++;
    }
}

/* ------------------------------------------------------------------ methods */

static PyObject *
FastUdp_on_readable(FastUdp *self, PyObject *Py_UNUSED(ignored))
{
    if (self->fd < 0 || self->busy)
        Py_RETURN_NONE;
    self->busy = 1;
    for (int i = 0; i < BATCH; i++) {
        self->riov[i].iov_base = self->rbuf + (size_t)i * SLOT;
        self->riov[i].iov_len = SLOT;
        struct msghdr *mh = &self->rmsg[i].msg_hdr;
        memset(mh, 0, sizeof(*mh));
        mh->msg_name = &self->raddr[i];
        mh->msg_namelen = sizeof(self->raddr[i]);
        mh->msg_iov = &self->riov[i];
        mh->msg_iovlen = 1;
    }
    int n = recvmmsg(self->fd, self->rmsg, self->batch, MSG_DONTWAIT, NULL);
    if (n < 0) {
        int err = errno;
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR)
            report_send_error(self, err);
        self->busy = 0;
        Py_RETURN_NONE;
    }
    PyObject *closing = PyObject_GetAttr(self->listener, s_closing);
    int is_closing = closing ? PyObject_IsTrue(closing) : -1;
    Py_XDECREF(closing);
    if (is_closing) { /* stopping: read and dropped, as datagram_received does */
        if (is_closing < 0)
            PyErr_WriteUnraisable(self->listener);
        self->busy = 0;
        Py_RETURN_NONE;
    }
    self->batches++;
    self->datagrams += n;
    Batch b;
    int fast = batch_begin(self, &b);
    int nout = 0;
    for (int i = 0; i < n; i++) {
        PyObject *host = NULL;
        int r = fast ? try_hit(self, &b, i, &nout, &host) : FALLBACK;
        if (r == ANSWERED || r == SILENT) {
            b.received++;
            continue;
        }
        if (r == FAILED) {
            b.received++;
            batch_flush(self, &b);
            report_failure(self, host);
            Py_XDECREF(host);
            continue;
        }
        /* Not ours: to the Python listener, exactly as its transport would hand it over. */
        self->passed++;
        batch_flush(self, &b);
        PyObject *data = PyBytes_FromStringAndSize((char *)self->rbuf + (size_t)i * SLOT,
                                                   self->rmsg[i].msg_len);
        PyObject *addr = data ? addr_of(self, i) : NULL;
        PyObject *res = addr ? PyObject_CallMethodObjArgs(self->listener, s_datagram_received,
                                                          data, addr, NULL) : NULL;
        if (res == NULL)
            report_failure(self, addr ? PyTuple_GET_ITEM(addr, 0) : NULL);
        Py_XDECREF(res);
        Py_XDECREF(data);
        Py_XDECREF(addr);
    }
    if (fast) {
        batch_flush(self, &b);
        batch_release(&b);
    }
    self->answered += nout;
    if (nout)
        send_batch(self, nout); /* a Python call above may have closed us: then dropped */
    for (int j = 0; j < nout; j++)
        Py_CLEAR(self->sref[j]);
    self->busy = 0;
    Py_RETURN_NONE;
}

/* sendto(data, addr): one reply from the Python path. Raises BlockingIOError when the
 * kernel will not take it now (the wrapper queues it). */
static PyObject *
FastUdp_sendto(FastUdp *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    PyObject *host;
    int port;
    unsigned int flow = 0, scope = 0;
    if (nargs != 2 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "sendto(data, addr)");
        return NULL;
    }
    if (!PyArg_ParseTuple(args[1], "Ui|II", &host, &port, &flow, &scope))
        return NULL;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return NULL;
    }
    const char *h = PyUnicode_AsUTF8(host);
    if (h == NULL)
        return NULL;
    struct sockaddr_storage sa;
    socklen_t salen;
    memset(&sa, 0, sizeof(sa));
    char tmp[NI_MAXHOST];
    const char *pct = strchr(h, '%');
    if (pct != NULL) {
        size_t l = (size_t)(pct - h) < sizeof(tmp) - 1 ? (size_t)(pct - h) : sizeof(tmp) - 1;
        memcpy(tmp, h, l);
        tmp[l] = 0;
        h = tmp;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)&sa;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&sa;
    if (inet_pton(AF_INET, h, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons(port);
        salen = sizeof(*s4);
    } else if (inet_pton(AF_INET6, h, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(port);
        s6->sin6_flowinfo = htonl(flow);
        s6->sin6_scope_id = scope;
        salen = sizeof(*s6);
    } else {
        PyErr_Format(PyExc_ValueError, "not a numeric address: %U", host);
        return NULL;
    }
    if (self->fd < 0) {
        PyErr_SetString(PyExc_OSError, "socket closed");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    ssize_t r;
    do {
        r = sendto(self->fd, buf.buf, buf.len, MSG_DONTWAIT, (struct sockaddr *)&sa, salen);
    } while (r < 0 && errno == EINTR);
    PyBuffer_Release(&buf);
    if (r < 0)
        return PyErr_SetFromErrno(errno == ENOBUFS ? PyExc_BlockingIOError : PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
FastUdp_close(FastUdp *self, PyObject *Py_UNUSED(ignored))
{
    /* The socket belongs to the wrapper (it closes it); from here on nothing is sent. */
    self->fd = -1;
    Py_RETURN_NONE;
}

static int
FastUdp_traverse(FastUdp *self, visitproc visit, void *arg)
{
    Py_VISIT(self->listener);
    Py_VISIT(self->handler);
    Py_VISIT(self->on_blocked);
    return 0;
}

static int
FastUdp_clear(FastUdp *self)
{
    Py_CLEAR(self->listener);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->on_blocked);
    Py_CLEAR(self->opt_rr);
    for (int k = 0; k < HOSTS; k++)
        Py_CLEAR(self->hosts[k].host);
    return 0;
}

static void
FastUdp_dealloc(FastUdp *self)
{
    PyObject_GC_UnTrack(self);
    FastUdp_clear(self);
    PyMem_RawFree(self->rbuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
FastUdp_init(FastUdp *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "listener", "handler", "opt_rr", "on_blocked", "batch", NULL};
    int fd, batch = BATCH;
    PyObject *listener, *handler, *opt_rr, *on_blocked;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOSO|i", kwlist, &fd, &listener, &handler,
                                     &opt_rr, &on_blocked, &batch))
        return -1;
    if (batch < 1 || batch > BATCH) {
        PyErr_Format(PyExc_ValueError, "batch must be 1..%d", BATCH);
        return -1;
    }
    self->batch = batch;
    if (self->rbuf == NULL) {
        self->rbuf = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (self->rbuf == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->fd = fd;
    Py_INCREF(listener);
    Py_XSETREF(self->listener, listener);
    Py_INCREF(handler);
    Py_XSETREF(self->handler, handler);
    Py_INCREF(opt_rr);
    Py_XSETREF(self->opt_rr, opt_rr);
    Py_INCREF(on_blocked);
    Py_XSETREF(self->on_blocked, on_blocked);
    return 0;
}

static PyMethodDef FastUdp_methods[] = {
    {"on_readable", (PyCFunction)FastUdp_on_readable, METH_NOARGS,
     "Read one batch from the socket, answer its hits, hand the rest to the listener."},
    {"sendto", (PyCFunction)(void (*)(void))FastUdp_sendto, METH_FASTCALL,
     "sendto(data, addr): send one reply now; BlockingIOError when the kernel is full."},
    {"close", (PyCFunction)FastUdp_close, METH_NOARGS, "Stop using the socket."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FastUdp_members[] = {
    {"answered", T_ULONGLONG, offsetof(FastUdp, answered), READONLY,
     "replies sent by the compiled path"},
    {"passed", T_ULONGLONG, offsetof(FastUdp, passed), READONLY,
     "datagrams handed to the Python listener"},
    {"batches", T_ULONGLONG, offsetof(FastUdp, batches), READONLY, "non-empty reads"},
    {"datagrams", T_ULONGLONG, offsetof(FastUdp, datagrams), READONLY, "datagrams read"},
    {"blocked", T_INT, offsetof(FastUdp, blocked), 0,
     "set while the wrapper holds a send backlog: replies queue behind it"},
    {"fd", T_INT, offsetof(FastUdp, fd), READONLY, "the socket, -1 once closed"},
    {"batch", T_INT, offsetof(FastUdp, batch), READONLY, "datagrams read per wake-up"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastUdpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.dns._fastudp.FastUdp",
    .tp_basicsize = sizeof(FastUdp),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FastUdp(fd, listener, handler, opt_rr, on_blocked, batch=64): the compiled UDP hit path",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastUdp_init,
    .tp_dealloc = (destructor)FastUdp_dealloc,
    .tp_traverse = (traverseproc)FastUdp_traverse,
    .tp_clear = (inquiry)FastUdp_clear,
    .tp_methods = FastUdp_methods,
    .tp_members = FastUdp_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastudp", "The compiled UDP hit path (see fastudp.py).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

static PyCFunction
builtin_meth(PyObject *obj, const char *name)
{
    PyObject *m = PyObject_GetAttrString(obj, name);
    PyCFunction f = NULL;
    if (m != NULL && PyCFunction_Check(m))
        f = ((PyCFunctionObject *)m)->m_ml->ml_meth;
    Py_XDECREF(m);
    return f;
}

PyMODINIT_FUNC
PyInit__fastudp(void)
{
    PyObject *d = PyDict_New(), *s = PySet_New(NULL);
    if (d == NULL || s == NULL)
        goto error;
    dict_get_meth = builtin_meth(d, "get");
    set_add_meth = builtin_meth(s, "add");
    Py_CLEAR(d);
    Py_CLEAR(s);
    if (dict_get_meth == NULL || set_add_meth == NULL)
        goto error;
    PyObject *time = PyImport_ImportModule("time");
    if (time == NULL)
        goto error;
    monotonic = PyObject_GetAttrString(time, "monotonic");
    Py_DECREF(time);
    if (monotonic == NULL)
        goto error;
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) goto error
    INTERN(s_get, "_get");
    INTERN(s_touch, "_touch");
    INTERN(s_now, "_now");
    INTERN(s_acl_get, "_acl_get");
    INTERN(s_ratelimit, "ratelimit");
    INTERN(s_allow, "allow");
    INTERN(s_cache, "cache");
    INTERN(s_resolver, "resolver");
    INTERN(s_rcodes, "rcodes");
    INTERN(s_max_udp_size, "max_udp_size");
    INTERN(s_hits, "hits");
    INTERN(s_truncated, "truncated");
    INTERN(s_ratelimited, "ratelimited");
    INTERN(s_received, "received");
    INTERN(s_closing, "closing");
    INTERN(s_rendered_body, "rendered_body");
    INTERN(s_prefetch, "prefetch");
    INTERN(s_error_received, "error_received");
    INTERN(s_hit_failed, "_hit_failed");
    INTERN(s_datagram_received, "datagram_received");
#undef INTERN
    if (PyType_Ready(&FastUdpType) < 0)
        goto error;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        goto error;
    Py_INCREF(&FastUdpType);
    if (PyModule_AddObject(m, "FastUdp", (PyObject *)&FastUdpType) < 0
        || PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(&FastUdpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
error:
    Py_XDECREF(d);
    Py_XDECREF(s);
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ImportError, "cannot set up _fastudp");
    return NULL;
}

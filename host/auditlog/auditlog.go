// Package auditlog receives the audit trail enclaves ship (enclave/audit)
// and appends it to a file on the parent: one entry a line, in the format
// of internal/auditfmt, which `nitrosign audit verify` (host/auditverify)
// checks.
//
// The protocol (enclave/audit documents it too): on connect the receiver
// writes {"last_head": {"chain","seq","hash"} | null}, the last head entry
// it stored, of any chain; the enclave names it in a new chain's genesis.
// The enclave then writes entries, one JSON line each; the receiver checks
// each one and appends it to the file, fsyncs, and writes
// {"chain": CHAIN, "ack": SEQ} (cumulative). An entry already stored
// (same chain and seq, e.g. sent again after a lost connection) is
// acknowledged and not written again.
//
// The file is opened O_APPEND (created 0600 if missing; its directory must
// exist) and never truncated or rewritten. Only lines that pass every
// check are written, whole: a line that does not parse, is not in
// canonical form, does not hash to its hash, breaks its chain (seq not the
// next, prev not the hash before it) or mixes chains on one connection is
// refused: logged at error, the entries before it on the connection
// stored and acknowledged, the connection closed. When a write or fsync
// fails, the receiver stores nothing more until it is restarted (the
// enclave keeps the entries and, once its backlog is full, refuses to
// sign); the next write after a partial one starts on a new line.
//
// Anything on the parent can connect to the port, so the receiver bounds
// what a peer can do: MaxConns connections, MaxPeerConns of them per peer,
// lines of MaxLine bytes, an IdleTimeout. A chain is bound to the peer
// (vsock CID) that first sent it: entries of that chain from another peer
// are refused. The receiver checks structure and links, not attestations
// or head signatures: the verifier does (a forged chain written here fails
// verification).
package auditlog

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdlayher/vsock"
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/internal/auditfmt"
	"github.com/nitrosign/nitrosign/internal/limits"
)

// Defaults of Config.
const (
	// DefaultPort is the vsock port the unit gives --enclave-audit-port,
	// where enclaves ship their audit trail (vsock://3:5052 on their side).
	DefaultPort         = 5052
	DefaultPath         = auditfmt.DefaultFile
	DefaultMaxConns     = 8
	DefaultMaxPeerConns = 2
	DefaultMaxLine      = auditfmt.MaxLine
	DefaultIdleTimeout  = 10 * time.Minute
	DefaultWriteTimeout = 10 * time.Second
	DefaultTailScan     = 32 << 20
	maxBatchEntries     = 4096
	maxBatchBytes       = 1 << 20
	maxChains           = 4096
)

// ErrStopped: a write or fsync of the file failed earlier; the receiver
// stores nothing more until it is restarted.
var ErrStopped = errors.New("audit file: an earlier write failed; nothing more is stored until nitrosign-proxy restarts")

// Config tunes a Receiver.
type Config struct {
	// Port is the vsock port (any CID) Module listens on. 0: Module does
	// nothing. The unit sets DefaultPort (5052).
	Port uint32
	// Path is the audit file, an absolute path; its directory must exist.
	// Default /var/lib/nitrosign/audit.jsonl (the unit's StateDirectory).
	Path string
	// MaxConns bounds the connections served at once; more are closed at
	// once. Default 8 (an enclave holds one).
	MaxConns int
	// MaxPeerConns bounds the connections of one peer (vsock CID, or IP
	// address) served at once, so that one peer cannot take every slot
	// and keep the enclaves' trails out (their backlog would fill and they
	// would stop signing). Default 2: an enclave's connection, and the
	// next one while the host has not yet seen the last one end.
	MaxPeerConns int
	// MaxLine bounds one entry's line, in bytes without the newline; a
	// longer one is refused. Default 64 KiB (auditfmt.MaxLine: a genesis
	// with the largest attestation document is about 22 KiB).
	MaxLine int
	// IdleTimeout closes a connection that sends nothing for this long
	// (the enclave dials again when it has entries). Default 10m.
	IdleTimeout time.Duration
	// WriteTimeout bounds one write to a peer (the first line, an ack).
	// Default 10s.
	WriteTimeout time.Duration
	// TailScan is how many bytes at the end of the file are read at start
	// to learn the last head and where each recent chain stands (so that
	// entries sent again are recognised). Default 32 MiB: twice an
	// enclave's whole backlog (enclave/audit DefaultMaxBacklogBytes).
	TailScan int64
	// LogDecisions logs every stored decision at info (fields only; the
	// message was never in it), and heads, in the proxy's log (journald).
	// Default false.
	LogDecisions bool
}

func (c Config) withDefaults() Config {
	if c.Path == "" {
		c.Path = DefaultPath
	}
	if c.MaxConns <= 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxPeerConns <= 0 {
		c.MaxPeerConns = DefaultMaxPeerConns
	}
	if c.MaxLine <= 0 {
		c.MaxLine = DefaultMaxLine
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.TailScan <= 0 {
		c.TailScan = DefaultTailScan
	}
	return c
}

// ValidatePath checks an audit file path: absolute and clean, naming a
// file.
func ValidatePath(path string) error {
	switch {
	case !filepath.IsAbs(path):
		return fmt.Errorf("audit file %q: want an absolute path", path)
	case filepath.Clean(path) != path || path == "/":
		return fmt.Errorf("audit file %q: want a clean path to a file (e.g. %s)", path, DefaultPath)
	}
	return nil
}

// Stats are a Receiver's counters.
type Stats struct {
	Written    uint64 // entries appended to the file
	Duplicates uint64 // entries acknowledged that were stored already
	Refused    uint64 // lines refused (each closes its connection)
}

// Receiver appends what enclaves ship to the audit file.
type Receiver struct {
	cfg   Config
	log   *zap.Logger
	conns limits.Conns

	peersMu sync.Mutex
	peers   map[string]int // connections open per peer

	mu          sync.Mutex
	f           *os.File
	chains      map[string]*chainState
	clock       uint64 // orders chainState.used
	lastHead    *auditfmt.Head
	broken      error
	needNewline bool // the file ends in a partial line

	written, duplicates, refused atomic.Uint64
}

// chainState is where a chain stands in the file.
type chainState struct {
	seq  uint64
	hash string
	peer string // who sent it ("" when learnt from the file)
	used uint64
}

// Open opens (or creates) the audit file and reads its tail. Close
// releases it.
func Open(cfg Config, log *zap.Logger) (*Receiver, error) {
	cfg = cfg.withDefaults()
	if err := ValidatePath(cfg.Path); err != nil {
		return nil, err
	}
	dir := filepath.Dir(cfg.Path)
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("audit file directory %s: %w", dir, err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("audit file directory %s: not a directory", dir)
	}
	f, err := os.OpenFile(cfg.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit file: %w", err)
	}
	r := &Receiver{cfg: cfg, log: log.Named("audit"), f: f, chains: map[string]*chainState{}, peers: map[string]int{}}
	if err := r.scanTail(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("audit file %s: %w", cfg.Path, err)
	}
	return r, nil
}

// scanTail learns the last head and the chains' positions from the last
// TailScan bytes of the file.
func (r *Receiver) scanTail() error {
	f, err := os.Open(r.cfg.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if st.Mode().Perm()&0o077 != 0 {
		r.log.Warn("the audit file can be read by others than the proxy's user", zap.String("file", r.cfg.Path), zap.Stringer("mode", st.Mode().Perm()))
	}
	if size == 0 {
		r.log.Info("audit file is new", zap.String("file", r.cfg.Path))
		return nil
	}
	var last [1]byte
	if _, err := f.ReadAt(last[:], size-1); err != nil {
		return err
	}
	r.needNewline = last[0] != '\n'
	off := max(0, size-r.cfg.TailScan)
	br := bufio.NewReaderSize(io.NewSectionReader(f, off, size-off), r.cfg.MaxLine+1)
	skip := off > 0 // the first line read is partial
	var entries, bad int
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			skip = false
			bad++
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return err
		}
		if skip {
			skip = false
			continue
		}
		e, perr := auditfmt.Parse(line[:len(line)-1])
		if perr != nil {
			bad++
			continue
		}
		entries++
		r.storedLocked(e, "")
	}
	fields := []zap.Field{zap.String("file", r.cfg.Path), zap.Int64("bytes", size), zap.Int64("scanned_from", off),
		zap.Int("entries_scanned", entries), zap.Int("chains", len(r.chains))}
	if r.lastHead != nil {
		fields = append(fields, zap.String("last_head", r.lastHead.String()))
	}
	if bad > 0 || r.needNewline {
		r.log.Warn("audit file has lines that are not entries (run nitrosign audit verify)", append(fields,
			zap.Int("bad_lines", bad), zap.Bool("ends_in_partial_line", r.needNewline))...)
	} else {
		r.log.Info("audit file opened", fields...)
	}
	return nil
}

// storedLocked records that e is in the file.
func (r *Receiver) storedLocked(e *auditfmt.Entry, peer string) {
	st := r.chains[e.Chain]
	if st == nil {
		if len(r.chains) >= maxChains {
			r.evictLocked()
		}
		st = &chainState{}
		r.chains[e.Chain] = st
	}
	st.seq, st.hash = e.Seq, e.Hash
	if peer != "" {
		st.peer = peer
	}
	r.clock++
	st.used = r.clock
	if e.Kind == auditfmt.KindHead {
		h := auditfmt.HeadOf(e)
		r.lastHead = &h
	}
}

// evictLocked forgets the chain written to least recently.
func (r *Receiver) evictLocked() {
	var oldest string
	var used uint64
	for id, st := range r.chains {
		if oldest == "" || st.used < used {
			oldest, used = id, st.used
		}
	}
	delete(r.chains, oldest)
}

// LastHead is the last head entry stored (nil: none).
func (r *Receiver) LastHead() *auditfmt.Head {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lastHead == nil {
		return nil
	}
	h := *r.lastHead
	return &h
}

// Stats returns the receiver's counters.
func (r *Receiver) Stats() Stats {
	return Stats{Written: r.written.Load(), Duplicates: r.duplicates.Load(), Refused: r.refused.Load()}
}

// Serve accepts connections on l until l is closed (then nil) or Close.
func (r *Receiver) Serve(l net.Listener) error {
	return r.conns.Serve(l, r.cfg.MaxConns, func(err error, open int64, refused uint64) {
		if err != nil {
			r.log.Warn("audit receiver: accept failed", zap.Error(err))
			return
		}
		r.log.Warn("audit connection refused: too many open", zap.Int64("open", open),
			zap.Int("limit", r.cfg.MaxConns), zap.Uint64("refused_since_last_line", refused))
	}, r.serveConn)
}

// Close ends every connection, waits for their handlers, and closes the
// file. The listener is the caller's to close.
func (r *Receiver) Close() error {
	r.conns.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	r.broken = errors.New("audit receiver closed")
	return err
}

// peerOf names the sender: its CID on vsock, its IP address otherwise.
func peerOf(c net.Conn) (string, zap.Field) {
	switch a := c.RemoteAddr().(type) {
	case *vsock.Addr:
		return "vsock:" + strconv.FormatUint(uint64(a.ContextID), 10), zap.Uint32("enclave_cid", a.ContextID)
	case *net.TCPAddr:
		return a.IP.String(), zap.String("enclave_peer", a.String())
	default:
		return c.RemoteAddr().String(), zap.String("enclave_peer", c.RemoteAddr().String())
	}
}

// connState is what a connection has sent: one chain, in order.
type connState struct {
	chain string
	seq   uint64
	hash  string
	any   bool
}

func (cs *connState) follow(e *auditfmt.Entry) error {
	if !cs.any {
		return nil
	}
	switch {
	case e.Chain != cs.chain:
		return fmt.Errorf("entry of chain %s on the connection of chain %s: one chain a connection", e.Chain, cs.chain)
	case e.Seq != cs.seq+1:
		return fmt.Errorf("seq %d after seq %d on this connection: want %d", e.Seq, cs.seq, cs.seq+1)
	case e.Prev != cs.hash:
		return fmt.Errorf("seq %d: prev %s is not the hash %s of seq %d", e.Seq, e.Prev, cs.hash, cs.seq)
	}
	return nil
}

func (cs *connState) took(e *auditfmt.Entry) {
	cs.chain, cs.seq, cs.hash, cs.any = e.Chain, e.Seq, e.Hash, true
}

// batch is the entries read at once, stored with one write and fsync.
type batch struct {
	entries []*auditfmt.Entry
	lines   [][]byte // each with its newline
	bytes   int
}

// serveConn greets the peer, then stores what it sends until it ends or
// sends something to refuse.
func (r *Receiver) serveConn(c net.Conn) {
	peer, peerField := peerOf(c)
	log := r.log.With(peerField)
	r.peersMu.Lock()
	open := r.peers[peer]
	if open < r.cfg.MaxPeerConns {
		r.peers[peer]++
	}
	r.peersMu.Unlock()
	if open >= r.cfg.MaxPeerConns {
		log.Warn("audit connection refused: this peer has too many open", zap.Int("open", open), zap.Int("limit", r.cfg.MaxPeerConns))
		return
	}
	defer func() {
		r.peersMu.Lock()
		if r.peers[peer]--; r.peers[peer] == 0 {
			delete(r.peers, peer)
		}
		r.peersMu.Unlock()
	}()
	hello := []byte(`{"last_head":null}` + "\n")
	if h := r.LastHead(); h != nil {
		hello = fmt.Appendf(nil, `{"last_head":{"chain":%q,"seq":%d,"hash":%q}}`+"\n", h.Chain, h.Seq, h.Hash)
	}
	_ = c.SetWriteDeadline(time.Now().Add(r.cfg.WriteTimeout))
	if _, err := c.Write(hello); err != nil {
		log.Debug("audit connection ended before the first line", zap.Error(err))
		return
	}
	br := bufio.NewReaderSize(c, r.cfg.MaxLine+1)
	var cs connState
	for {
		b, refuse, ioErr := r.read(c, br, &cs)
		if len(b.entries) > 0 {
			chain, ack, haveAck, err := r.commit(peer, b, log)
			if haveAck {
				_ = c.SetWriteDeadline(time.Now().Add(r.cfg.WriteTimeout))
				if _, werr := c.Write(fmt.Appendf(nil, `{"chain":%q,"ack":%d}`+"\n", chain, ack)); werr != nil {
					log.Debug("audit ack not sent", zap.Error(werr))
					return
				}
			}
			if err != nil {
				if !errors.Is(err, ErrStopped) {
					r.refused.Add(1)
				}
				log.Error("audit entries refused: the connection is closed", zap.Error(err))
				return
			}
		}
		if refuse != nil {
			r.refused.Add(1)
			log.Error("audit line refused: the connection is closed; nothing of it was written", zap.Error(refuse))
			return
		}
		if ioErr != nil {
			if !errors.Is(ioErr, io.EOF) && !errors.Is(ioErr, net.ErrClosed) {
				log.Debug("audit connection ended", zap.Error(ioErr))
			}
			return
		}
	}
}

// read reads at least one line, and then what is already buffered, up to
// a batch: the valid entries, then the reason to refuse the next line or
// the error that ended the connection.
func (r *Receiver) read(c net.Conn, br *bufio.Reader, cs *connState) (b batch, refuse, ioErr error) {
	for {
		_ = c.SetReadDeadline(time.Now().Add(r.cfg.IdleTimeout))
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return b, fmt.Errorf("a line longer than %d bytes", r.cfg.MaxLine), nil
		}
		if err != nil {
			// A last line without its newline is incomplete: not stored.
			return b, nil, err
		}
		e, err := auditfmt.Parse(line[:len(line)-1])
		if err != nil {
			return b, fmt.Errorf("line %q: %w", clip(line), err), nil
		}
		if err := cs.follow(e); err != nil {
			return b, err, nil
		}
		cs.took(e)
		b.entries = append(b.entries, e)
		b.lines = append(b.lines, bytes.Clone(line))
		b.bytes += len(line)
		if br.Buffered() == 0 || len(b.entries) >= maxBatchEntries || b.bytes >= maxBatchBytes {
			return b, nil, nil
		}
	}
}

func clip(line []byte) string {
	if len(line) > 100 {
		return string(line[:100]) + "..."
	}
	return string(bytes.TrimSuffix(line, []byte("\n")))
}

// commit appends b's new entries to the file with one write and one fsync
// and returns the chain and seq to acknowledge (haveAck). Entries the file
// has already are acknowledged and not written. An entry that does not
// follow what the file holds of its chain is refused (error), with what
// follows it; the ones before it are stored and acknowledged.
func (r *Receiver) commit(peer string, b batch, log *zap.Logger) (chain string, ack uint64, haveAck bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.broken != nil {
		return "", 0, false, r.broken
	}
	var (
		out     []byte
		stored  []*auditfmt.Entry
		refuse  error
		acked   = -1 // index in b of the last entry to acknowledge
		dups    uint64
		pending = map[string]*chainState{} // states after this batch, before it is written
	)
	state := func(chain string) *chainState {
		if st, ok := pending[chain]; ok {
			return st
		}
		if st := r.chains[chain]; st != nil {
			cp := *st
			pending[chain] = &cp
			return &cp
		}
		return nil
	}
	for i, e := range b.entries {
		st := state(e.Chain)
		switch {
		case st == nil:
			if e.Seq != 0 {
				log.Warn("audit chain unknown to this host continues at this seq: its earlier entries are not in the file's scanned tail",
					zap.String("chain", e.Chain), zap.Uint64("seq", e.Seq))
			}
			pending[e.Chain] = &chainState{seq: e.Seq, hash: e.Hash, peer: peer}
		case st.peer != "" && st.peer != peer:
			refuse = fmt.Errorf("chain %s seq %d: the chain is %s's, this connection is %s's", e.Chain, e.Seq, st.peer, peer)
		case e.Seq < st.seq || (e.Seq == st.seq && e.Hash == st.hash):
			dups++
			acked = i
			continue
		case e.Seq == st.seq:
			refuse = fmt.Errorf("chain %s seq %d: the file holds another entry at this seq (hash %s, this one %s)", e.Chain, e.Seq, st.hash, e.Hash)
		case e.Seq == st.seq+1 && e.Prev != st.hash:
			refuse = fmt.Errorf("chain %s seq %d: prev %s is not the hash %s of seq %d in the file", e.Chain, e.Seq, e.Prev, st.hash, st.seq)
		case e.Seq > st.seq+1:
			refuse = fmt.Errorf("chain %s seq %d: the file holds this chain up to seq %d: seq %d to %d are missing", e.Chain, e.Seq, st.seq, st.seq+1, e.Seq-1)
		default:
			st.seq, st.hash, st.peer = e.Seq, e.Hash, peer
		}
		if refuse != nil {
			break
		}
		out = append(out, b.lines[i]...)
		stored = append(stored, e)
		acked = i
	}
	if len(out) > 0 {
		if r.needNewline {
			out = append([]byte{'\n'}, out...)
		}
		n, werr := r.f.Write(out)
		if werr != nil {
			err := werr
			r.needNewline = r.needNewline || (n > 0 && out[n-1] != '\n')
			r.broken = fmt.Errorf("%w: write: %w", ErrStopped, err)
			log.Error("audit file write failed: storing stops; restart nitrosign-proxy once the cause is fixed",
				zap.String("file", r.cfg.Path), zap.Error(err))
			return "", 0, false, r.broken
		}
		if serr := r.f.Sync(); serr != nil {
			err := serr
			r.broken = fmt.Errorf("%w: fsync: %w", ErrStopped, err)
			log.Error("audit file fsync failed: storing stops; restart nitrosign-proxy once the cause is fixed",
				zap.String("file", r.cfg.Path), zap.Error(err))
			return "", 0, false, r.broken
		}
		r.needNewline = false
		for _, e := range stored {
			r.storedLocked(e, peer)
			r.logEntry(log, e)
		}
	}
	r.written.Add(uint64(len(stored)))
	r.duplicates.Add(dups)
	if acked < 0 {
		return "", 0, false, refuse
	}
	e := b.entries[acked]
	return e.Chain, e.Seq, true, refuse
}

// logEntry logs a stored entry when LogDecisions is set (decisions and
// heads at info), and heads at debug otherwise.
func (r *Receiver) logEntry(log *zap.Logger, e *auditfmt.Entry) {
	switch e.Kind {
	case auditfmt.KindDecision:
		if !r.cfg.LogDecisions {
			return
		}
		log.Info("audit decision", zap.String("chain", e.Chain), zap.Uint64("seq", e.Seq), zap.String("time", e.Time),
			zap.String("caller", e.Caller), zap.String("caller_id", e.CallerID), zap.String("method", e.Method),
			zap.String("key_id", e.KeyID), zap.String("algorithm", e.Algorithm), zap.String("message_sha256", e.MessageSHA256),
			zap.String("outcome", e.Outcome), zap.String("code", e.Code), zap.String("reason", e.Reason))
	case auditfmt.KindHead:
		fields := []zap.Field{zap.String("chain", e.Chain), zap.Uint64("seq", e.Seq), zap.String("hash", e.Hash), zap.Uint64("signs_seq", e.SignedSeq)}
		if r.cfg.LogDecisions {
			log.Info("audit head", fields...)
		} else {
			log.Debug("audit head", fields...)
		}
	case auditfmt.KindGenesis:
		fields := []zap.Field{zap.String("chain", e.Chain), zap.String("time", e.Time)}
		if e.PreviousHead != nil {
			fields = append(fields, zap.String("previous_head", e.PreviousHead.String()))
		}
		log.Info("audit chain started", fields...)
	}
}

// Module receives audit trails on vsock port Config.Port (any CID) with
// the app (nothing when it is 0): OnStart opens the file and serves,
// OnStop closes the connections and the file.
var Module = fx.Module("auditlog", fx.Invoke(register))

// ListenFunc opens the listener the receiver serves on. Without one in
// the graph it is vsock.Listen(Config.Port); tests give a TCP one.
type ListenFunc func() (net.Listener, error)

// Params are Module's dependencies.
type Params struct {
	fx.In

	Config    Config
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
	Listen    ListenFunc `optional:"true"`
}

func register(p Params) {
	if p.Config.Port == 0 {
		return
	}
	cfg := p.Config.withDefaults()
	listen := p.Listen
	if listen == nil {
		listen = func() (net.Listener, error) { return vsock.Listen(cfg.Port, nil) }
	}
	var (
		r      *Receiver
		l      net.Listener
		served = make(chan struct{})
	)
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(context.Context) error {
			var err error
			if r, err = Open(cfg, p.Log); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("audit receiver: %w (the unit's StateDirectory=nitrosign makes /var/lib/nitrosign)", err)
				}
				return fmt.Errorf("audit receiver: %w", err)
			}
			if l, err = listen(); err != nil {
				_ = r.Close()
				return fmt.Errorf("audit receiver: listen on vsock port %d: %w (turn it off with --enclave-audit-port 0)", cfg.Port, err)
			}
			r.log.Info("receiving enclaves' audit trails", zap.Uint32("vsock_port", cfg.Port), zap.String("addr", l.Addr().String()),
				zap.String("file", cfg.Path), zap.Bool("log_decisions", cfg.LogDecisions))
			go func() {
				defer close(served)
				if err := r.Serve(l); err != nil {
					r.log.Error("audit receiver stopped", zap.Error(err))
				}
			}()
			return nil
		},
		OnStop: func(context.Context) error {
			_ = l.Close()
			<-served
			return r.Close()
		},
	})
}

// Package audit keeps the enclave's audit trail of signing decisions: every
// decision (allowed or denied) is appended to a hash-chained log whose head
// the enclave signs with an attested key, and shipped to the host, which
// stores it in an append-only file (host/auditlog) that anyone can check
// (host/auditverify, `nitrosign audit verify`).
//
// # Format
//
// The entries, their canonical encoding (what each hash covers) and the
// head signature are specified in package internal/auditfmt, whose
// documentation is enough to write an independent verifier. In short: one
// JSON object per line; every entry has chain (16 random bytes, hex, per
// enclave start), seq (0, 1, 2, ...), time (RFC 3339 UTC, nanoseconds),
// kind, prev (hash of entry seq-1; zeros for seq 0) and hash, the hex
// SHA-256 of
//
//	"nitrosign-audit-entry-v1\n" || for each member but hash, in order:
//	    uint32_be(len(name)) || name || uint32_be(len(value)) || value
//
// The genesis (seq 0) carries the chain's Ed25519 audit key (DER SPKI),
// an attestation document whose public_key is that SPKI, and the head the
// host said it stored last (previous_head, or null). A decision carries
// caller, caller_id, method, key_id, algorithm, message_sha256 (SHA-256 of
// the message or digest: the message itself never enters the log),
// outcome, code and reason. A head carries signed_seq and signed_hash (the
// entry just before it) and signature, Ed25519 by the audit key over
//
//	"nitrosign-audit-head-v1\n" + chain + "\n" + signed_seq + "\n" + signed_hash
//
// # Chain life
//
// New makes a fresh audit key (it never leaves the enclave), has it
// attested, and appends the genesis and at once a head that signs it. A
// head is then appended after every Config.HeadEvery decisions, after
// Config.HeadInterval when at least one decision came since the last, and
// by Close. An enclave restart starts a new chain, whose genesis names
// the last head the host said it stored (Shipper.Connect): verifiers link
// chains that way and report a chain that does not follow its predecessor.
//
// # Bounds: fail closed
//
// Entries stay in memory until the host acknowledges them (it does after
// fsync). That backlog is bounded by Config.MaxBacklog entries and
// Config.MaxBacklogBytes bytes (defaults 65536 and 16 MiB: at about 500
// bytes a decision, some 30,000 decisions, a minute of full signing load,
// or hours of an ordinary one, without the host). When a decision does not
// fit, Append returns ErrBacklogFull and records nothing: the caller must
// then refuse to sign, since a decision that cannot be recorded must not
// happen. Room for one head is always kept, so that what was recorded can
// be signed.
package audit

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

// Defaults of Config.
const (
	DefaultHeadEvery       = 256
	DefaultHeadInterval    = time.Second
	DefaultMaxBacklog      = 65536
	DefaultMaxBacklogBytes = 16 << 20
)

// headReserve is the room, in bytes, kept for one head line (about 420
// bytes with the largest seq; TestHeadLineFitsReserve checks it).
const headReserve = 512

var (
	// ErrBacklogFull: the host has not acknowledged enough entries for
	// this one to be kept. Nothing was recorded: refuse the operation.
	ErrBacklogFull = errors.New("audit: backlog full: the host has not acknowledged the audit entries; the decision was not recorded")
	// ErrClosed: the log was closed.
	ErrClosed = errors.New("audit: log closed")
	// ErrDecision: a Decision that cannot be an entry (an unknown outcome,
	// a code that contradicts it).
	ErrDecision = errors.New("audit: invalid decision")
)

// Config tunes a Log. The zero value takes every default.
type Config struct {
	// HeadEvery appends a head after this many decisions. Default 256:
	// one Ed25519 signature (about 25 µs here) per 256 decisions.
	HeadEvery int
	// HeadInterval appends a head this long after the last one when a
	// decision came since. Default 1s: an entry is unsigned for at most
	// about a second.
	HeadInterval time.Duration
	// MaxBacklog bounds the entries kept until the host acknowledges
	// them. Default 65536.
	MaxBacklog int
	// MaxBacklogBytes bounds their bytes (lines as sent). Default 16 MiB.
	MaxBacklogBytes int
}

func (c Config) withDefaults() Config {
	if c.HeadEvery <= 0 {
		c.HeadEvery = DefaultHeadEvery
	}
	if c.HeadInterval <= 0 {
		c.HeadInterval = DefaultHeadInterval
	}
	if c.MaxBacklog <= 0 {
		c.MaxBacklog = DefaultMaxBacklog
	}
	if c.MaxBacklogBytes <= 0 {
		c.MaxBacklogBytes = DefaultMaxBacklogBytes
	}
	return c
}

// Validate checks c (zero fields take their defaults).
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	if c.MaxBacklog < 4 {
		errs = append(errs, fmt.Errorf("audit backlog of %d entries: want at least 4 (genesis, head, a decision, a head)", c.MaxBacklog))
	}
	if min := auditfmt.MaxLine + 3*headReserve; c.MaxBacklogBytes < min {
		errs = append(errs, fmt.Errorf("audit backlog of %d bytes: want at least %d (the largest genesis and heads)", c.MaxBacklogBytes, min))
	}
	return errors.Join(errs...)
}

// Head names a head entry: what the host says it stored last, and what a
// new chain's genesis names (auditfmt.Head).
type Head = auditfmt.Head

// Outcome is what was decided.
type Outcome string

// Outcomes.
const (
	Allowed Outcome = auditfmt.OutcomeAllowed
	Denied  Outcome = auditfmt.OutcomeDenied
)

// Decision is one signing decision. It holds the SHA-256 of the message or
// digest, never the message: no message byte can reach the log.
type Decision struct {
	// Caller is the caller's name; CallerID its key id, hex (empty for an
	// anonymous development call).
	Caller   string
	CallerID string
	// Method is the gRPC method, e.g. /nitrosign.v1.SignerService/Sign.
	Method string
	// KeyID and Algorithm are what the caller asked for (either may be
	// empty: the default key, the key's default algorithm).
	KeyID     string
	Algorithm string
	// MessageSHA256 is the SHA-256 of the message (RAW) or of the digest
	// (DIGEST) as the caller sent it.
	MessageSHA256 [32]byte
	// Outcome is Allowed (Code must be codes.OK) or Denied (Code must not).
	Outcome Outcome
	Code    codes.Code
	// Reason is a short text (why denied); never message bytes.
	Reason string
}

// AttestFunc returns an attestation document whose public_key is spki
// (the chain's audit key, DER SubjectPublicKeyInfo).
type AttestFunc func(spki []byte) ([]byte, error)

// Stats are a Log's counters.
type Stats struct {
	Chain        string
	Next         uint64 // seq of the next entry
	Decisions    uint64 // decisions recorded
	Heads        uint64 // heads appended
	Refused      uint64 // decisions refused with ErrBacklogFull
	Backlog      int    // entries not acknowledged by the host
	BacklogBytes int
}

// Log is an enclave's audit chain. Append is safe for concurrent use.
type Log struct {
	cfg   Config
	now   func() time.Time
	key   ed25519.PrivateKey
	chain string

	mu        sync.Mutex
	closed    bool
	seq       uint64 // next seq
	prev      string // hash of entry seq-1
	lastKind  auditfmt.Kind
	sinceHead int // decisions since the last head
	scratch   []byte
	q         []pending // not acknowledged, oldest first, from q[start]
	start     int
	qBytes    int
	drained   chan struct{} // closed and replaced whenever the backlog empties
	decisions uint64
	heads     uint64
	refused   uint64

	wake chan struct{} // entries appended (capacity 1)
	stop chan struct{}
	done chan struct{}
}

type pending struct {
	seq  uint64
	line []byte // the line as sent, newline included; never modified
}

// New starts a chain: a fresh Ed25519 audit key, its attestation (attest
// gets the key's DER SPKI), the genesis naming previous (the host's last
// stored head; nil when none or when the host did not answer in time),
// and a head that signs it. now gives entries their time (nil:
// time.Now). Close ends it.
func New(cfg Config, attest AttestFunc, previous *Head, now func() time.Time) (*Log, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if attest == nil {
		return nil, errors.New("audit: no attestation function")
	}
	if now == nil {
		now = time.Now
	}
	if previous != nil {
		// The host's word, checked like any input.
		if err := previous.Validate(); err != nil {
			return nil, fmt.Errorf("audit: previous head: %w", err)
		}
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("audit: audit key: %w", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("audit: audit key: %w", err)
	}
	doc, err := attest(spki)
	if err != nil {
		return nil, fmt.Errorf("audit: attestation of the audit key: %w", err)
	}
	if len(doc) == 0 || len(doc) > auditfmt.MaxAttestation {
		return nil, fmt.Errorf("audit: attestation document of %d bytes: want 1 to %d", len(doc), auditfmt.MaxAttestation)
	}
	id := make([]byte, auditfmt.ChainBytes)
	_, _ = rand.Read(id) // never fails (crypto/rand)
	l := &Log{
		cfg:     cfg,
		now:     now,
		key:     priv,
		chain:   hex.EncodeToString(id),
		prev:    auditfmt.ZeroHash,
		drained: make(chan struct{}),
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	var ph *Head
	if previous != nil {
		p := *previous
		ph = &p
	}
	g := auditfmt.Entry{Kind: auditfmt.KindGenesis, AuditKey: spki, Attestation: doc, PreviousHead: ph}
	l.mu.Lock()
	err = l.appendLocked(&g, false)
	if err == nil {
		err = l.headLocked()
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	go l.tick()
	return l, nil
}

// Chain is the chain's id.
func (l *Log) Chain() string { return l.chain }

// Append records d. It returns ErrBacklogFull when the host has not
// acknowledged enough entries to keep it, ErrClosed after Close, and
// ErrDecision for an inconsistent d; on any error nothing was recorded
// and the operation must be refused. Text fields are cut to
// auditfmt.MaxText bytes and invalid UTF-8 replaced.
func (l *Log) Append(d Decision) error {
	e, err := d.entry()
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if err := l.appendLocked(&e, true); err != nil {
		l.refused++
		return err
	}
	l.decisions++
	l.sinceHead++
	if l.sinceHead >= l.cfg.HeadEvery {
		// Fits: appendLocked kept room for it.
		_ = l.headLocked()
	}
	l.notify()
	return nil
}

// entry is d as a decision entry, without chain, seq, time and prev.
func (d *Decision) entry() (auditfmt.Entry, error) {
	switch {
	case d.Outcome != Allowed && d.Outcome != Denied:
		return auditfmt.Entry{}, fmt.Errorf("%w: outcome %q: want allowed or denied", ErrDecision, d.Outcome)
	case d.Outcome == Allowed && d.Code != codes.OK:
		return auditfmt.Entry{}, fmt.Errorf("%w: allowed with code %v: want OK", ErrDecision, d.Code)
	case d.Outcome == Denied && d.Code == codes.OK:
		return auditfmt.Entry{}, fmt.Errorf("%w: denied with code OK", ErrDecision)
	}
	code := d.Code.String()
	if !auditfmt.IsCodeName(code) {
		return auditfmt.Entry{}, fmt.Errorf("%w: code %d is not a gRPC status code", ErrDecision, uint32(d.Code))
	}
	return auditfmt.Entry{
		Kind:          auditfmt.KindDecision,
		Caller:        text(d.Caller),
		CallerID:      text(d.CallerID),
		Method:        text(d.Method),
		KeyID:         text(d.KeyID),
		Algorithm:     text(d.Algorithm),
		MessageSHA256: hex.EncodeToString(d.MessageSHA256[:]),
		Outcome:       string(d.Outcome),
		Code:          code,
		Reason:        text(d.Reason),
	}, nil
}

// text makes s a valid text member: valid UTF-8 of at most MaxText bytes.
func text(s string) string {
	if len(s) <= auditfmt.MaxText && utf8.ValidString(s) {
		return s
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) > auditfmt.MaxText {
		cut := auditfmt.MaxText
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	return s
}

// appendLocked gives e the next seq, the time and prev, seals it and keeps
// its line in the backlog. reserve keeps room for one head after it.
func (l *Log) appendLocked(e *auditfmt.Entry, reserve bool) error {
	e.Chain, e.Seq, e.Time, e.Prev = l.chain, l.seq, auditfmt.FormatTime(l.now()), l.prev
	// A decision line is about 560 bytes with empty texts; escapes
	// are rare (a quote, a control byte).
	size := 640 + len(e.Caller) + len(e.CallerID) + len(e.Method) + len(e.KeyID) + len(e.Algorithm) + len(e.Reason)
	if e.Kind == auditfmt.KindGenesis {
		size += 2 * (len(e.AuditKey) + len(e.Attestation))
	}
	line, scratch := e.Seal(make([]byte, 0, size), l.scratch)
	l.scratch = scratch
	n, bytes := 1, len(line)
	if reserve {
		n, bytes = 2, bytes+headReserve
	}
	if have := len(l.q) - l.start; have+n > l.cfg.MaxBacklog || l.qBytes+bytes > l.cfg.MaxBacklogBytes {
		return fmt.Errorf("%w (%d entries, %d bytes waiting; limits %d entries, %d bytes)",
			ErrBacklogFull, have, l.qBytes, l.cfg.MaxBacklog, l.cfg.MaxBacklogBytes)
	}
	l.q = append(l.q, pending{seq: e.Seq, line: line})
	l.qBytes += len(line)
	l.seq++
	l.prev = e.Hash
	l.lastKind = e.Kind
	return nil
}

// headLocked appends a head that signs the last entry.
func (l *Log) headLocked() error {
	h := auditfmt.Entry{Kind: auditfmt.KindHead, SignedSeq: l.seq - 1, SignedHash: l.prev}
	h.Signature = ed25519.Sign(l.key, auditfmt.HeadMessage(l.chain, h.SignedSeq, h.SignedHash))
	if err := l.appendLocked(&h, false); err != nil {
		return err
	}
	l.sinceHead = 0
	l.heads++
	return nil
}

// tick appends a head every HeadInterval when decisions came since the
// last one.
func (l *Log) tick() {
	defer close(l.done)
	t := time.NewTicker(l.cfg.HeadInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			l.mu.Lock()
			if !l.closed && l.sinceHead > 0 && l.headLocked() == nil {
				l.notify()
			}
			l.mu.Unlock()
		case <-l.stop:
			return
		}
	}
}

// notify wakes the shipper.
func (l *Log) notify() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Close appends a last head (when entries came since the last one) and
// refuses further decisions. The entries stay until the shipper sends them
// (Shipper.Close waits for that).
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	var err error
	if l.lastKind != auditfmt.KindHead {
		if err = l.headLocked(); err != nil {
			err = fmt.Errorf("audit: last head: %w", err)
		}
	}
	l.notify()
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	return err
}

// Stats returns the log's counters.
func (l *Log) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{
		Chain: l.chain, Next: l.seq, Decisions: l.decisions, Heads: l.heads, Refused: l.refused,
		Backlog: len(l.q) - l.start, BacklogBytes: l.qBytes,
	}
}

// firstUnacked is the seq of the oldest entry not acknowledged (the next
// one to be appended when none is waiting).
func (l *Log) firstUnacked() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.firstUnackedLocked()
}

func (l *Log) firstUnackedLocked() uint64 {
	if l.start < len(l.q) {
		return l.q[l.start].seq
	}
	return l.seq
}

// take returns the lines of entries from seq from on, at most maxBytes of
// them (at least one line), and the seq after the last.
func (l *Log) take(from uint64, maxBytes int) ([][]byte, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	first := l.firstUnackedLocked()
	if from < first {
		from = first
	}
	var lines [][]byte
	size := 0
	for i := l.start + int(from-first); i < len(l.q); i++ {
		p := l.q[i]
		if len(lines) > 0 && size+len(p.line) > maxBytes {
			break
		}
		lines = append(lines, p.line)
		size += len(p.line)
		from = p.seq + 1
	}
	return lines, from
}

// ack drops the entries up to seq, which the host stored. An ack of an
// entry never appended is an error.
func (l *Log) ack(seq uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if seq >= l.seq {
		return fmt.Errorf("host acknowledged seq %d, the log has entries up to %d", seq, l.seq-1)
	}
	for l.start < len(l.q) && l.q[l.start].seq <= seq {
		l.qBytes -= len(l.q[l.start].line)
		l.q[l.start] = pending{}
		l.start++
	}
	if l.start == len(l.q) {
		l.q, l.start = l.q[:0], 0
		close(l.drained)
		l.drained = make(chan struct{})
	} else if l.start >= 1024 && l.start >= len(l.q)/2 {
		// Compact: the slots of acknowledged entries are reused.
		n := copy(l.q, l.q[l.start:])
		clear(l.q[n:])
		l.q, l.start = l.q[:n], 0
	}
	return nil
}

// waiting reports whether entries wait for the host's acknowledgement,
// and a channel closed once none does.
func (l *Log) waiting() (bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.start < len(l.q), l.drained
}

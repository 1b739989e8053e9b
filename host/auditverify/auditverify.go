// Package auditverify checks an audit file (host/auditlog writes it, in
// the format of internal/auditfmt): for each chain, the genesis'
// attestation document (host/verify: chained to the AWS root, or a
// development root, at the document's own timestamp; the PCRs asked for;
// not a debug enclave unless allowed), that the document's public_key is
// the chain's audit key, every hash, every prev link, contiguous seqs,
// every head's signature; and across chains, that each genesis'
// previous_head is a head earlier in the file.
//
// It reports every fault with its line number and kind (Fault), and goes
// on: after a broken link it takes the entry as the chain's new position,
// so that one removal is one fault, not one per later entry. Entries after
// a chain's last head are not signed yet (the enclave may still be
// running, or stopped without its last head): a warning, not an error.
//
// What the file alone cannot show: entries removed from the end of the
// last chain together with its last heads (compare the last head with one
// kept elsewhere, e.g. the proxy's log with --audit-log-decisions), and
// whole chains removed from the start of a file whose first chain names no
// previous head.
//
// Memory: the file is read twice, line by line (a line is at most
// MaxLine); what is kept is a small state per chain and the heads that
// geneses name, and at most MaxFaults faults.
package auditverify

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"

	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

const (
	// MaxLine bounds a line the verifier reads, in bytes; a longer one is
	// a syntax fault (the host writes at most auditfmt.MaxLine).
	MaxLine = 1 << 20
	// MaxFaults bounds the faults reported one by one; beyond it they are
	// only counted (Report.FaultsOmitted).
	MaxFaults = 1000
)

// FaultKind says what is wrong.
type FaultKind string

// Kinds of faults.
const (
	// FaultSyntax: a line that is not an entry.
	FaultSyntax FaultKind = "syntax"
	// FaultEdited: an entry's hash does not match its content.
	FaultEdited FaultKind = "edited"
	// FaultNotCanonical: an entry's line was reformatted (not as the host
	// writes it), its content intact.
	FaultNotCanonical FaultKind = "not_canonical"
	// FaultRemoved: a seq gap, or a prev that is not the hash of the entry
	// before: entries were removed (or one replaced, its hash recomputed).
	FaultRemoved FaultKind = "removed"
	// FaultReordered: an entry after one with a higher seq of its chain,
	// or a head a genesis names that comes after that genesis.
	FaultReordered FaultKind = "reordered"
	// FaultDuplicate: an entry twice.
	FaultDuplicate FaultKind = "duplicate"
	// FaultForgedHead: a head whose signature is not the audit key's.
	FaultForgedHead FaultKind = "forged_head"
	// FaultAttestation: a genesis' attestation document does not verify.
	FaultAttestation FaultKind = "attestation"
	// FaultKeyMismatch: the document's public_key is not the audit key.
	FaultKeyMismatch FaultKind = "key_mismatch"
	// FaultNoGenesis: a chain whose genesis is not in the file before its
	// first entry: its start was removed, or the file does not begin at
	// its start. Its heads cannot be checked.
	FaultNoGenesis FaultKind = "no_genesis"
	// FaultGap: a genesis names a previous head that is not in the file:
	// chains between were removed.
	FaultGap FaultKind = "gap"
	// FaultUnlinked (warning): a genesis that names no previous head while
	// chains precede it: the enclave started without an answer from the
	// host.
	FaultUnlinked FaultKind = "unlinked"
	// FaultUnsigned (warning): entries after a chain's last head.
	FaultUnsigned FaultKind = "unsigned"
)

// Severity of a fault: an error fails verification, a warning does not.
type Severity string

// Severities.
const (
	Error   Severity = "error"
	Warning Severity = "warning"
)

// Fault is one finding.
type Fault struct {
	// Line is the line it is on (1-based); for a chain's unsigned tail,
	// the first unsigned entry's.
	Line     int       `json:"line"`
	Kind     FaultKind `json:"kind"`
	Severity Severity  `json:"severity"`
	Chain    string    `json:"chain,omitempty"`
	Seq      *uint64   `json:"seq,omitempty"`
	Message  string    `json:"message"`
}

func (f Fault) String() string {
	s := "line " + strconv.Itoa(f.Line) + ": " + string(f.Severity) + ": " + string(f.Kind)
	if f.Chain != "" {
		s += " (chain " + f.Chain
		if f.Seq != nil {
			s += " seq " + strconv.FormatUint(*f.Seq, 10)
		}
		s += ")"
	}
	return s + ": " + f.Message
}

// Chain is what the file holds of one chain.
type Chain struct {
	ID        string `json:"chain"`
	FirstLine int    `json:"first_line"`
	LastLine  int    `json:"last_line"`
	Entries   int    `json:"entries"`
	Decisions int    `json:"decisions"`
	Allowed   int    `json:"allowed"`
	Denied    int    `json:"denied"`
	Heads     int    `json:"heads"`
	// Started is the genesis' time (empty without a genesis).
	Started string `json:"started,omitempty"`
	LastSeq uint64 `json:"last_seq"`
	// Attested: the genesis' document verified and binds the audit key.
	Attested bool   `json:"attested"`
	ModuleID string `json:"module_id,omitempty"`
	// PreviousHead is what the genesis names; LastHead the chain's last
	// head in the file.
	PreviousHead *auditfmt.Head `json:"previous_head,omitempty"`
	LastHead     *auditfmt.Head `json:"last_head,omitempty"`
	// Unsigned counts the entries after the last head.
	Unsigned int `json:"unsigned"`
}

// Report is the result of a verification.
type Report struct {
	Lines         int      `json:"lines"`
	Chains        []*Chain `json:"chains"`
	Faults        []Fault  `json:"faults"`
	FaultsOmitted int      `json:"faults_omitted,omitempty"`
	Errors        int      `json:"errors"`
	Warnings      int      `json:"warnings"`
	// OK: no error (warnings allowed).
	OK bool `json:"ok"`
}

// Options say what a genesis' attestation must satisfy.
type Options struct {
	// Attestation: the trusted root (nil: the AWS Nitro Enclaves root),
	// the PCRs expected, AllowDebug. Its Time is not used: each document
	// is verified at its own timestamp (its certificates live hours); Nonce
	// and key commitment are not checked.
	Attestation verify.Options
}

// VerifyFile verifies the audit file at path. The error is for a file
// that cannot be read; faults are in the report.
func VerifyFile(path string, opts Options) (*Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return Verify(f, opts)
}

// Verify verifies the audit file read from r (read twice: the first pass
// collects the heads geneses name).
func Verify(r io.ReadSeeker, opts Options) (*Report, error) {
	wanted, err := namedHeads(r)
	if err != nil {
		return nil, err
	}
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	v := &verifier{opts: opts, wanted: wanted, chains: map[string]*chainState{}, rep: &Report{Chains: []*Chain{}, Faults: []Fault{}}}
	err = eachLine(r, func(n int, line []byte, tooLong bool) {
		v.rep.Lines = n
		v.line(n, line, tooLong)
	})
	if err != nil {
		return nil, err
	}
	v.finish()
	return v.rep, nil
}

// eachLine calls fn for every line of r (newline removed), numbered from
// 1; a line longer than MaxLine is passed as nil with tooLong set. A last
// line without a newline is a line too.
func eachLine(r io.Reader, fn func(n int, line []byte, tooLong bool)) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var buf []byte // a line longer than br's buffer, gathered
	tooLong := false
	n := 0
	for {
		chunk, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if !tooLong && len(buf)+len(chunk) > MaxLine {
				tooLong, buf = true, buf[:0]
			} else if !tooLong {
				buf = append(buf, chunk...)
			}
			continue
		}
		eof := errors.Is(err, io.EOF)
		if err != nil && !eof {
			return err
		}
		if eof && len(chunk) == 0 && len(buf) == 0 && !tooLong {
			return nil
		}
		line := chunk
		if len(buf) > 0 && !tooLong {
			buf = append(buf, chunk...)
			line = buf
		}
		line = bytes.TrimSuffix(line, []byte("\n"))
		if len(line) > MaxLine {
			tooLong = true
		}
		n++
		if tooLong {
			fn(n, nil, true)
		} else {
			fn(n, line, false)
		}
		buf, tooLong = buf[:0], false
		if eof {
			return nil
		}
	}
}

// namedHeads is the set of heads the file's geneses name.
func namedHeads(r io.Reader) (map[auditfmt.Head]bool, error) {
	wanted := map[auditfmt.Head]bool{}
	genesis := []byte("genesis") // in every genesis line, however written
	err := eachLine(r, func(_ int, line []byte, tooLong bool) {
		if tooLong || !bytes.Contains(line, genesis) {
			return
		}
		if e, _ := auditfmt.Parse(line); e != nil && e.Kind == auditfmt.KindGenesis && e.PreviousHead != nil {
			wanted[*e.PreviousHead] = false
		}
	})
	return wanted, err
}

// chainState is where a chain stands while the file is read.
type chainState struct {
	rep      *Chain
	key      []byte // the audit key (DER SPKI), nil without a genesis
	lastSeq  uint64
	lastHash string
	lastLine int
	// sinceHead counts the entries after the last head, from
	// unsignedSeq at unsignedLine.
	sinceHead    int
	unsignedSeq  uint64
	unsignedLine int
	// gap is the last seq gap, kept to tell a removal from a reordering.
	gapFrom, gapTo uint64
	gapFault       int // index in Faults, -1 when none
}

type verifier struct {
	opts   Options
	wanted map[auditfmt.Head]bool // heads geneses name: seen yet?
	// gapFaults are the faults of geneses that named a head not seen yet
	// (a reordering when it comes later).
	gapFaults map[auditfmt.Head][]int
	chains    map[string]*chainState
	rep       *Report
}

func (v *verifier) fault(line int, kind FaultKind, sev Severity, chain string, seq *uint64, format string, a ...any) int {
	if sev == Error {
		v.rep.Errors++
	} else {
		v.rep.Warnings++
	}
	if len(v.rep.Faults) >= MaxFaults {
		v.rep.FaultsOmitted++
		return -1
	}
	v.rep.Faults = append(v.rep.Faults, Fault{Line: line, Kind: kind, Severity: sev, Chain: chain, Seq: seq, Message: fmt.Sprintf(format, a...)})
	return len(v.rep.Faults) - 1
}

func seqp(s uint64) *uint64 { return &s }

// line checks line n.
func (v *verifier) line(n int, line []byte, tooLong bool) {
	if tooLong {
		v.fault(n, FaultSyntax, Error, "", nil, "a line longer than %d bytes", MaxLine)
		return
	}
	if len(line) == 0 {
		v.fault(n, FaultSyntax, Error, "", nil, "an empty line")
		return
	}
	e, err := auditfmt.Parse(line)
	if e == nil {
		v.fault(n, FaultSyntax, Error, "", nil, "%v", err)
		return
	}
	switch {
	case errors.Is(err, auditfmt.ErrHash):
		v.fault(n, FaultEdited, Error, e.Chain, seqp(e.Seq), "the %s's hash does not match its content: it was edited", e.Kind)
	case errors.Is(err, auditfmt.ErrNotCanonical):
		v.fault(n, FaultNotCanonical, Error, e.Chain, seqp(e.Seq), "the line was reformatted (not as the host writes it); its content hashes right")
	}
	cs := v.chains[e.Chain]
	if cs == nil {
		cs = &chainState{rep: &Chain{ID: e.Chain, FirstLine: n}, gapFault: -1}
		v.chains[e.Chain] = cs
		v.rep.Chains = append(v.rep.Chains, cs.rep)
		if e.Seq != 0 {
			v.fault(n, FaultNoGenesis, Error, e.Chain, seqp(e.Seq),
				"the chain's first entry in the file is seq %d: seq 0 to %d, its genesis included, are not before it (removed, or the file starts after them); its heads cannot be checked", e.Seq, e.Seq-1)
		}
	} else if !v.follow(cs, n, e) {
		return
	}
	cs.lastSeq, cs.lastHash, cs.lastLine = e.Seq, e.Hash, n
	cs.rep.Entries++
	cs.rep.LastLine = n
	cs.rep.LastSeq = e.Seq
	switch e.Kind {
	case auditfmt.KindGenesis:
		v.genesis(cs, n, e)
	case auditfmt.KindDecision:
		cs.rep.Decisions++
		if e.Outcome == auditfmt.OutcomeAllowed {
			cs.rep.Allowed++
		} else {
			cs.rep.Denied++
		}
	case auditfmt.KindHead:
		v.head(cs, n, e)
	}
	if e.Kind == auditfmt.KindHead {
		cs.sinceHead = 0
	} else {
		if cs.sinceHead == 0 {
			cs.unsignedSeq, cs.unsignedLine = e.Seq, n
		}
		cs.sinceHead++
	}
}

// follow checks that e comes next in cs; false when e is to be skipped
// (an entry out of order, a duplicate).
func (v *verifier) follow(cs *chainState, n int, e *auditfmt.Entry) bool {
	next := cs.lastSeq + 1
	switch {
	case e.Seq == cs.lastSeq && e.Hash == cs.lastHash:
		v.fault(n, FaultDuplicate, Error, e.Chain, seqp(e.Seq), "the entry of line %d again", cs.lastLine)
		return false
	case e.Seq < next:
		if cs.gapFault >= 0 && e.Seq >= cs.gapFrom && e.Seq <= cs.gapTo {
			f := &v.rep.Faults[cs.gapFault]
			if f.Kind == FaultRemoved {
				f.Kind = FaultReordered
				f.Message = strings.TrimSuffix(f.Message, " (removed)") + fmt.Sprintf("; seq %d comes later, at line %d: reordered", e.Seq, n)
			}
		}
		v.fault(n, FaultReordered, Error, e.Chain, seqp(e.Seq), "seq %d comes after seq %d (line %d): out of order", e.Seq, cs.lastSeq, cs.lastLine)
		return false
	case e.Seq > next:
		cs.gapFrom, cs.gapTo = next, e.Seq-1
		cs.gapFault = v.fault(n, FaultRemoved, Error, e.Chain, seqp(e.Seq), "seq %d follows seq %d (line %d): %s missing here (removed)",
			e.Seq, cs.lastSeq, cs.lastLine, seqRange(next, e.Seq-1))
	case e.Prev != cs.lastHash:
		v.fault(n, FaultRemoved, Error, e.Chain, seqp(e.Seq),
			"prev is not the hash of seq %d (line %d): an entry was removed and the seqs renumbered, or seq %d replaced", cs.lastSeq, cs.lastLine, cs.lastSeq)
	}
	return true
}

// seqRange says which seqs: "seq 3 is", "seq 3 to 5 are".
func seqRange(from, to uint64) string {
	if from == to {
		return fmt.Sprintf("seq %d is", from)
	}
	return fmt.Sprintf("seq %d to %d are", from, to)
}

// genesis checks a chain's genesis: its document, its key, its link.
func (v *verifier) genesis(cs *chainState, n int, e *auditfmt.Entry) {
	cs.key = e.AuditKey
	cs.rep.Started = e.Time
	cs.rep.PreviousHead = e.PreviousHead
	doc, err := v.attestation(e.Attestation)
	switch {
	case err != nil:
		v.fault(n, FaultAttestation, Error, e.Chain, seqp(0), "the attestation document does not verify: %v", err)
	case !bytes.Equal(doc.PublicKey, e.AuditKey):
		v.fault(n, FaultKeyMismatch, Error, e.Chain, seqp(0), "the attestation document's public_key is not the chain's audit key")
		cs.rep.ModuleID = doc.ModuleID
	default:
		cs.rep.Attested = true
		cs.rep.ModuleID = doc.ModuleID
	}
	ph := e.PreviousHead
	switch {
	case ph == nil:
		if len(v.rep.Chains) > 1 {
			v.fault(n, FaultUnlinked, Warning, e.Chain, seqp(0),
				"the chain names no previous head, and %d chain(s) precede it: the enclave started without an answer from the host", len(v.rep.Chains)-1)
		}
	case v.wanted[*ph]:
	default:
		i := v.fault(n, FaultGap, Error, e.Chain, seqp(0),
			"previous_head %s is not a head earlier in the file: the chain(s) between were removed", ph.String())
		if i >= 0 {
			if v.gapFaults == nil {
				v.gapFaults = map[auditfmt.Head][]int{}
			}
			v.gapFaults[*ph] = append(v.gapFaults[*ph], i)
		}
	}
}

// attestation verifies a genesis' document at its own timestamp.
func (v *verifier) attestation(doc []byte) (*verify.Document, error) {
	at, err := documentTime(doc)
	if err != nil {
		return nil, err
	}
	o := v.opts.Attestation
	o.Time, o.Nonce, o.Keys, o.UserData, o.RequireKeyCommitment = at, nil, nil, nil, false
	return verify.Verify(doc, o)
}

// documentTime reads a document's timestamp, unverified, to verify its
// certificates at that time.
func documentTime(doc []byte) (time.Time, error) {
	if len(doc) == 0 || len(doc) > verify.MaxDocumentSize {
		return time.Time{}, fmt.Errorf("%w: document of %d bytes", verify.ErrMalformed, len(doc))
	}
	var msg cose.Sign1Message
	var err error
	if doc[0] == 0xd2 {
		err = msg.UnmarshalCBOR(doc)
	} else {
		err = (*cose.UntaggedSign1Message)(&msg).UnmarshalCBOR(doc)
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("%w: COSE_Sign1: %w", verify.ErrMalformed, err)
	}
	var p struct {
		Timestamp *uint64 `cbor:"timestamp"`
	}
	if err := cbor.Unmarshal(msg.Payload, &p); err != nil || p.Timestamp == nil || *p.Timestamp > 1<<62 {
		return time.Time{}, fmt.Errorf("%w: no timestamp in the payload", verify.ErrMalformed)
	}
	return time.UnixMilli(int64(*p.Timestamp)), nil
}

// head checks a head's signature.
func (v *verifier) head(cs *chainState, n int, e *auditfmt.Entry) {
	cs.rep.Heads++
	h := auditfmt.HeadOf(e)
	cs.rep.LastHead = &h
	if cs.key != nil {
		key, err := auditfmt.AuditKey(cs.key)
		if err != nil || !auditfmt.VerifyHead(key, e) {
			v.fault(n, FaultForgedHead, Error, e.Chain, seqp(e.Seq), "the head's signature is not the chain's audit key's: forged")
		}
	}
	if seen, ok := v.wanted[h]; ok && !seen {
		v.wanted[h] = true
		for _, i := range v.gapFaults[h] {
			f := &v.rep.Faults[i]
			f.Kind = FaultReordered
			f.Message = fmt.Sprintf("previous_head %s is at line %d, after this genesis: reordered", h.String(), n)
		}
		delete(v.gapFaults, h)
	}
}

// finish reports the unsigned tails and concludes.
func (v *verifier) finish() {
	for _, c := range v.rep.Chains {
		cs := v.chains[c.ID]
		if cs.sinceHead == 0 {
			continue
		}
		c.Unsigned = cs.sinceHead
		v.fault(cs.unsignedLine, FaultUnsigned, Warning, c.ID, seqp(cs.unsignedSeq),
			"%d %s after the chain's last head (seq %d to %d, lines %d to %d): not signed yet (the enclave is running, or stopped before its last head)",
			cs.sinceHead, plural(cs.sinceHead, "entry", "entries"), cs.unsignedSeq, cs.lastSeq, cs.unsignedLine, cs.lastLine)
	}
	v.rep.OK = v.rep.Errors == 0
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// Package auditfmt is the format of nitrosign's audit trail of signing
// decisions: the entries the enclave appends to its hash-chained log
// (enclave/audit), the host stores (host/auditlog) and anyone verifies
// (host/auditverify, `nitrosign audit verify`). Both sides use this one
// package, so the bytes hashed are the same bytes everywhere; this comment
// is the specification a third party needs to write a verifier of its own.
//
// # File
//
// A file is a sequence of lines, each one entry: a JSON object (RFC 8259)
// ending in "\n". Entries of several chains may interleave (several
// enclaves on one parent); within a chain they appear in seq order.
//
// # Entry
//
// Every entry has these members, in this order:
//
//	chain  16 random bytes, 32 lowercase hex digits: one chain per enclave start
//	seq    integer: 0, 1, 2, ... contiguous within a chain
//	time   RFC 3339 UTC with nanoseconds, always 9 fraction digits
//	       ("2026-05-01T12:00:00.000000001Z"): when the enclave appended it
//	kind   "genesis" (seq 0, and only there), "decision" or "head"
//	prev   hash of the entry seq-1 of the chain; 64 zeros for seq 0
//
// then the members of its kind (below), then
//
//	hash   64 lowercase hex digits: SHA-256 of the entry's canonical encoding
//
// genesis (seq 0):
//
//	audit_key      base64 (standard, padded) of the DER SubjectPublicKeyInfo
//	               of the chain's Ed25519 audit key, made in the enclave for
//	               this chain; its private half never leaves the enclave
//	attestation    base64 of an attestation document (COSE_Sign1, at most
//	               16 KiB) whose public_key is exactly that SPKI
//	previous_head  {"chain": hex, "seq": integer, "hash": hex}: the last head
//	               entry the host said it had stored when this chain began
//	               (of an earlier chain), or null when it named none
//
// decision:
//
//	caller          name of the caller (may be empty)
//	caller_id       hex key id of the caller (empty for anonymous development calls)
//	method          gRPC method, e.g. /nitrosign.v1.SignerService/Sign
//	key_id          the key asked for (may be empty: the default key)
//	algorithm       KMS algorithm name, e.g. ECDSA_SHA_256 (may be empty)
//	message_sha256  64 lowercase hex digits: SHA-256 of the message or digest
//	                the caller sent (never the message itself)
//	outcome         "allowed" or "denied"
//	code            gRPC status code name: "OK" when allowed, another when denied
//	reason          short text (may be empty); never message bytes
//
// caller, caller_id, method, key_id, algorithm and reason are valid UTF-8
// of at most MaxText bytes each.
//
// head:
//
//	signed_seq   seq of the entry just before this one (seq-1)
//	signed_hash  hash of that entry (equal to prev)
//	signature    base64 of the Ed25519 signature by the chain's audit key of
//	             "nitrosign-audit-head-v1\n" + chain + "\n" + signed_seq (decimal)
//	             + "\n" + signed_hash
//
// A head signs, through the prev links, every entry of its chain before it.
//
// # Canonical encoding (what hash is computed over)
//
//	"nitrosign-audit-entry-v1\n" || field(name_1, value_1) || ... || field(name_n, value_n)
//	field(name, value) = uint32_be(len(name)) || name || uint32_be(len(value)) || value
//
// with the entry's members in the order listed above, hash excluded, prev
// included. A value is the member's text: a string's content as UTF-8 after
// JSON unescaping (base64 members: their base64 text), an integer's
// decimal digits. previous_head becomes three fields, previous_head.chain,
// previous_head.seq and previous_head.hash, each with an empty value when
// it is null.
//
// # Canonical JSON
//
// Lines are written by one encoder: members in the order above, no
// whitespace, strings escaped only where JSON requires it (\" \\ \b \f \n
// \r \t, other bytes below 0x20 as \u00XX, lowercase hex, everything else
// verbatim), integers in decimal. The host refuses, and the verifier
// reports, a line that parses but is not byte for byte what this encoder
// writes for its values: such a line was not written by the host.
//
// Test vector: TestCanonicalVector in this package's tests.
package auditfmt

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"
)

// Kind is what an entry records.
type Kind string

// Kinds of entries.
const (
	KindGenesis  Kind = "genesis"
	KindDecision Kind = "decision"
	KindHead     Kind = "head"
)

// Outcomes of a decision.
const (
	OutcomeAllowed = "allowed"
	OutcomeDenied  = "denied"
)

// Sizes and prefixes of the format.
const (
	// EntryDomain starts every entry's canonical encoding.
	EntryDomain = "nitrosign-audit-entry-v1\n"
	// HeadDomain starts the message a head's signature covers.
	HeadDomain = "nitrosign-audit-head-v1\n"
	// ChainBytes is the size of a chain id (hex: twice as many digits).
	ChainBytes = 16
	// MaxText bounds, in bytes, each text member of a decision.
	MaxText = 256
	// MaxAttestation bounds the genesis' attestation document, in bytes
	// (the NSM answers in at most 12 KiB; host/verify's MaxDocumentSize).
	MaxAttestation = 16 << 10
	// MaxLine bounds an entry's line, in bytes, newline excluded: a
	// genesis with the largest document is about 22 KiB, a decision at
	// most about 2 KiB.
	MaxLine = 64 << 10
	// TimeLayout is the layout of time: UTC, nanoseconds, 9 digits.
	TimeLayout = "2006-01-02T15:04:05.000000000Z"
	// DefaultFile is where nitrosign-proxy keeps the audit file (its
	// --audit-file, in the unit's StateDirectory).
	DefaultFile = "/var/lib/nitrosign/audit.jsonl"
)

// ZeroHash is prev of seq 0.
var ZeroHash = string(bytes.Repeat([]byte{'0'}, 2*sha256.Size))

// Errors of Parse. Each error Parse returns wraps exactly one of them.
var (
	// ErrSyntax: not an entry: not a JSON object, a member missing,
	// unknown, of the wrong type or ill-formed, or members of another
	// kind.
	ErrSyntax = errors.New("not an audit entry")
	// ErrHash: a well-formed entry whose hash is not the SHA-256 of its
	// canonical encoding: it was edited after it was written.
	ErrHash = errors.New("hash does not match the entry's content")
	// ErrNotCanonical: a well-formed entry with a correct hash whose line
	// is not byte for byte what the encoder writes (spaces, member order,
	// escapes, duplicate members): not as the host wrote it.
	ErrNotCanonical = errors.New("line is not in canonical form")
)

// Head names a head entry: its chain, seq and hash.
type Head struct {
	Chain string `json:"chain"`
	Seq   uint64 `json:"seq"`
	Hash  string `json:"hash"`
}

// String is chain:seq:hash.
func (h Head) String() string { return h.Chain + ":" + strconv.FormatUint(h.Seq, 10) + ":" + h.Hash }

// Validate checks that h can name a head: a chain id, a seq > 0 (a head
// is never the genesis) and a hash.
func (h Head) Validate() error {
	if !isHex(h.Chain, 2*ChainBytes) || !isHex(h.Hash, 2*sha256.Size) || h.Seq == 0 {
		return fmt.Errorf("%w: head %s: want a chain (%d hex digits), a seq > 0 and a hash (%d hex digits)",
			ErrSyntax, clip(h.String()), 2*ChainBytes, 2*sha256.Size)
	}
	return nil
}

// Entry is one entry of a chain. Which members are meaningful depends on
// Kind; the others are zero.
type Entry struct {
	Chain string
	Seq   uint64
	Time  string
	Kind  Kind
	Prev  string

	// genesis
	AuditKey     []byte // DER SPKI
	Attestation  []byte
	PreviousHead *Head

	// decision
	Caller, CallerID, Method, KeyID, Algorithm string
	MessageSHA256                              string
	Outcome, Code, Reason                      string

	// head
	SignedSeq  uint64
	SignedHash string
	Signature  []byte

	Hash string
}

// FormatTime renders t as an entry's time (TimeLayout).
func FormatTime(t time.Time) string {
	t = t.UTC()
	y := t.Year()
	if y < 0 || y > 9999 {
		return t.Format(TimeLayout)
	}
	// time.Format's general parser is a tenth of Append's cost: this is
	// the same text, digit by digit.
	var b [len(TimeLayout)]byte
	mo, d := t.Month(), t.Day()
	h, mi, s := t.Clock()
	put := func(i, v, n int) {
		for j := i + n - 1; j >= i; j-- {
			b[j] = byte('0' + v%10)
			v /= 10
		}
	}
	put(0, y, 4)
	b[4] = '-'
	put(5, int(mo), 2)
	b[7] = '-'
	put(8, d, 2)
	b[10] = 'T'
	put(11, h, 2)
	b[13] = ':'
	put(14, mi, 2)
	b[16] = ':'
	put(17, s, 2)
	b[19] = '.'
	put(20, t.Nanosecond(), 9)
	b[29] = 'Z'
	return string(b[:])
}

// HeadMessage is what a head's signature covers.
func HeadMessage(chain string, signedSeq uint64, signedHash string) []byte {
	b := make([]byte, 0, len(HeadDomain)+len(chain)+len(signedHash)+24)
	b = append(b, HeadDomain...)
	b = append(b, chain...)
	b = append(b, '\n')
	b = strconv.AppendUint(b, signedSeq, 10)
	b = append(b, '\n')
	return append(b, signedHash...)
}

// AuditKey parses a genesis' audit_key: an Ed25519 SPKI.
func AuditKey(spki []byte) (ed25519.PublicKey, error) {
	k, err := x509.ParsePKIXPublicKey(spki)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("audit key: a %T, want Ed25519", k)
	}
	return pub, nil
}

// VerifyHead reports whether head's signature is the audit key's over its
// signed seq and hash.
func VerifyHead(key ed25519.PublicKey, head *Entry) bool {
	return head.Kind == KindHead && len(head.Signature) == ed25519.SignatureSize &&
		ed25519.Verify(key, HeadMessage(head.Chain, head.SignedSeq, head.SignedHash), head.Signature)
}

// AppendCanonical appends e's canonical encoding (hash excluded) to dst.
func (e *Entry) AppendCanonical(dst []byte) []byte {
	dst = append(dst, EntryDomain...)
	var num [20]byte
	dst = field(dst, "chain", e.Chain)
	dst = fieldBytes(dst, "seq", strconv.AppendUint(num[:0], e.Seq, 10))
	dst = field(dst, "time", e.Time)
	dst = field(dst, "kind", string(e.Kind))
	dst = field(dst, "prev", e.Prev)
	switch e.Kind {
	case KindGenesis:
		dst = fieldB64(dst, "audit_key", e.AuditKey)
		dst = fieldB64(dst, "attestation", e.Attestation)
		if h := e.PreviousHead; h != nil {
			dst = field(dst, "previous_head.chain", h.Chain)
			dst = fieldBytes(dst, "previous_head.seq", strconv.AppendUint(num[:0], h.Seq, 10))
			dst = field(dst, "previous_head.hash", h.Hash)
		} else {
			dst = field(dst, "previous_head.chain", "")
			dst = field(dst, "previous_head.seq", "")
			dst = field(dst, "previous_head.hash", "")
		}
	case KindDecision:
		dst = field(dst, "caller", e.Caller)
		dst = field(dst, "caller_id", e.CallerID)
		dst = field(dst, "method", e.Method)
		dst = field(dst, "key_id", e.KeyID)
		dst = field(dst, "algorithm", e.Algorithm)
		dst = field(dst, "message_sha256", e.MessageSHA256)
		dst = field(dst, "outcome", e.Outcome)
		dst = field(dst, "code", e.Code)
		dst = field(dst, "reason", e.Reason)
	case KindHead:
		dst = fieldBytes(dst, "signed_seq", strconv.AppendUint(num[:0], e.SignedSeq, 10))
		dst = field(dst, "signed_hash", e.SignedHash)
		dst = fieldB64(dst, "signature", e.Signature)
	}
	return dst
}

func field(dst []byte, name, value string) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(name)))
	dst = append(dst, name...)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(value)))
	return append(dst, value...)
}

func fieldBytes(dst []byte, name string, value []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(name)))
	dst = append(dst, name...)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(value)))
	return append(dst, value...)
}

func fieldB64(dst []byte, name string, value []byte) []byte {
	n := base64.StdEncoding.EncodedLen(len(value))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(name)))
	dst = append(dst, name...)
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	return base64.StdEncoding.AppendEncode(dst, value)
}

// ComputeHash is the hex SHA-256 of e's canonical encoding. scratch, when
// not nil, is a buffer to reuse; the grown buffer is returned.
func (e *Entry) ComputeHash(scratch []byte) (string, []byte) {
	scratch = e.AppendCanonical(scratch[:0])
	sum := sha256.Sum256(scratch)
	return hex.EncodeToString(sum[:]), scratch
}

// AppendJSON appends e's line (canonical JSON, with hash, no newline).
func (e *Entry) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"chain":`...)
	dst = appendString(dst, e.Chain)
	dst = append(dst, `,"seq":`...)
	dst = strconv.AppendUint(dst, e.Seq, 10)
	dst = append(dst, `,"time":`...)
	dst = appendString(dst, e.Time)
	dst = append(dst, `,"kind":`...)
	dst = appendString(dst, string(e.Kind))
	dst = append(dst, `,"prev":`...)
	dst = appendString(dst, e.Prev)
	switch e.Kind {
	case KindGenesis:
		dst = append(dst, `,"audit_key":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, e.AuditKey)
		dst = append(dst, `","attestation":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, e.Attestation)
		dst = append(dst, `","previous_head":`...)
		if h := e.PreviousHead; h != nil {
			dst = append(dst, `{"chain":`...)
			dst = appendString(dst, h.Chain)
			dst = append(dst, `,"seq":`...)
			dst = strconv.AppendUint(dst, h.Seq, 10)
			dst = append(dst, `,"hash":`...)
			dst = appendString(dst, h.Hash)
			dst = append(dst, '}')
		} else {
			dst = append(dst, "null"...)
		}
	case KindDecision:
		for _, m := range [...]struct{ name, v string }{
			{`,"caller":`, e.Caller}, {`,"caller_id":`, e.CallerID}, {`,"method":`, e.Method},
			{`,"key_id":`, e.KeyID}, {`,"algorithm":`, e.Algorithm}, {`,"message_sha256":`, e.MessageSHA256},
			{`,"outcome":`, e.Outcome}, {`,"code":`, e.Code}, {`,"reason":`, e.Reason},
		} {
			dst = append(dst, m.name...)
			dst = appendString(dst, m.v)
		}
	case KindHead:
		dst = append(dst, `,"signed_seq":`...)
		dst = strconv.AppendUint(dst, e.SignedSeq, 10)
		dst = append(dst, `,"signed_hash":`...)
		dst = appendString(dst, e.SignedHash)
		dst = append(dst, `,"signature":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, e.Signature)
		dst = append(dst, '"')
	}
	dst = append(dst, `,"hash":`...)
	dst = appendString(dst, e.Hash)
	return append(dst, '}')
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string, escaping only what JSON
// requires. s must be valid UTF-8 (Validate checks it).
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		dst = append(dst, s[start:i]...)
		switch c {
		case '"', '\\':
			dst = append(dst, '\\', c)
		case '\b':
			dst = append(dst, '\\', 'b')
		case '\f':
			dst = append(dst, '\\', 'f')
		case '\n':
			dst = append(dst, '\\', 'n')
		case '\r':
			dst = append(dst, '\\', 'r')
		case '\t':
			dst = append(dst, '\\', 't')
		default:
			dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		start = i + 1
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// Seal sets e.Hash from its content and returns its line (canonical
// JSON, with the trailing newline) appended to dst. scratch is reused for
// the canonical encoding (see ComputeHash).
func (e *Entry) Seal(dst, scratch []byte) (line, grown []byte) {
	e.Hash, grown = e.ComputeHash(scratch)
	line = e.AppendJSON(dst)
	return append(line, '\n'), grown
}

// wire is an entry as JSON; pointers tell absent members from empty ones.
type wire struct {
	Chain *string `json:"chain"`
	Seq   *uint64 `json:"seq"`
	Time  *string `json:"time"`
	Kind  *string `json:"kind"`
	Prev  *string `json:"prev"`

	AuditKey     *string         `json:"audit_key"`
	Attestation  *string         `json:"attestation"`
	PreviousHead json.RawMessage `json:"previous_head"`

	Caller        *string `json:"caller"`
	CallerID      *string `json:"caller_id"`
	Method        *string `json:"method"`
	KeyID         *string `json:"key_id"`
	Algorithm     *string `json:"algorithm"`
	MessageSHA256 *string `json:"message_sha256"`
	Outcome       *string `json:"outcome"`
	Code          *string `json:"code"`
	Reason        *string `json:"reason"`

	SignedSeq  *uint64 `json:"signed_seq"`
	SignedHash *string `json:"signed_hash"`
	Signature  *string `json:"signature"`

	Hash *string `json:"hash"`
}

// Parse reads one line (without its newline) strictly: a well-formed
// entry (Validate), whose hash matches its content, written in canonical
// JSON. On ErrHash and ErrNotCanonical the parsed entry is returned with
// the error, so that a verifier can go on along the chain; on ErrSyntax,
// nil.
func Parse(line []byte) (*Entry, error) {
	if len(line) > MaxLine {
		return nil, fmt.Errorf("%w: line of %d bytes, limit %d", ErrSyntax, len(line), MaxLine)
	}
	if !utf8.Valid(line) {
		return nil, fmt.Errorf("%w: not valid UTF-8", ErrSyntax)
	}
	var w wire
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSyntax, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: more than one JSON value on the line", ErrSyntax)
	}
	if _, err := dec.Token(); err == nil {
		return nil, fmt.Errorf("%w: trailing data after the entry", ErrSyntax)
	}
	e, err := w.entry()
	if err != nil {
		return nil, err
	}
	if err := e.Validate(); err != nil {
		return nil, err
	}
	if h, _ := e.ComputeHash(nil); h != e.Hash {
		return e, fmt.Errorf("%w: seq %d of chain %s: hash is %s, its content hashes to %s", ErrHash, e.Seq, e.Chain, e.Hash, h)
	}
	if !bytes.Equal(e.AppendJSON(make([]byte, 0, len(line))), line) {
		return e, fmt.Errorf("%w: seq %d of chain %s", ErrNotCanonical, e.Seq, e.Chain)
	}
	return e, nil
}

// entry turns the members into an Entry, checking presence and types.
func (w *wire) entry() (*Entry, error) {
	missing := func(name string) error { return fmt.Errorf("%w: no %q", ErrSyntax, name) }
	if w.Chain == nil {
		return nil, missing("chain")
	}
	if w.Seq == nil {
		return nil, missing("seq")
	}
	if w.Time == nil {
		return nil, missing("time")
	}
	if w.Kind == nil {
		return nil, missing("kind")
	}
	if w.Prev == nil {
		return nil, missing("prev")
	}
	if w.Hash == nil {
		return nil, missing("hash")
	}
	e := &Entry{Chain: *w.Chain, Seq: *w.Seq, Time: *w.Time, Kind: Kind(*w.Kind), Prev: *w.Prev, Hash: *w.Hash}
	genesis := []bool{w.AuditKey != nil, w.Attestation != nil, w.PreviousHead != nil}
	decision := []bool{w.Caller != nil, w.CallerID != nil, w.Method != nil, w.KeyID != nil, w.Algorithm != nil,
		w.MessageSHA256 != nil, w.Outcome != nil, w.Code != nil, w.Reason != nil}
	head := []bool{w.SignedSeq != nil, w.SignedHash != nil, w.Signature != nil}
	set := func(b []bool) (all, any bool) {
		all = true
		for _, x := range b {
			all, any = all && x, any || x
		}
		return all, any
	}
	ga, gs := set(genesis)
	da, ds := set(decision)
	ha, hs := set(head)
	var err error
	switch e.Kind {
	case KindGenesis:
		if !ga || ds || hs {
			return nil, fmt.Errorf("%w: a genesis has exactly audit_key, attestation and previous_head", ErrSyntax)
		}
		if e.AuditKey, err = decodeB64(*w.AuditKey); err != nil {
			return nil, fmt.Errorf("%w: audit_key: %v", ErrSyntax, err)
		}
		if e.Attestation, err = decodeB64(*w.Attestation); err != nil {
			return nil, fmt.Errorf("%w: attestation: %v", ErrSyntax, err)
		}
		if !bytes.Equal(w.PreviousHead, []byte("null")) {
			var h struct {
				Chain *string `json:"chain"`
				Seq   *uint64 `json:"seq"`
				Hash  *string `json:"hash"`
			}
			dec := json.NewDecoder(bytes.NewReader(w.PreviousHead))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&h); err != nil {
				return nil, fmt.Errorf("%w: previous_head: %v", ErrSyntax, err)
			}
			if h.Chain == nil || h.Seq == nil || h.Hash == nil {
				return nil, fmt.Errorf("%w: previous_head: want chain, seq and hash, or null", ErrSyntax)
			}
			e.PreviousHead = &Head{Chain: *h.Chain, Seq: *h.Seq, Hash: *h.Hash}
		}
	case KindDecision:
		if !da || gs || hs {
			return nil, fmt.Errorf("%w: a decision has exactly caller, caller_id, method, key_id, algorithm, message_sha256, outcome, code and reason", ErrSyntax)
		}
		e.Caller, e.CallerID, e.Method, e.KeyID, e.Algorithm = *w.Caller, *w.CallerID, *w.Method, *w.KeyID, *w.Algorithm
		e.MessageSHA256, e.Outcome, e.Code, e.Reason = *w.MessageSHA256, *w.Outcome, *w.Code, *w.Reason
	case KindHead:
		if !ha || gs || ds {
			return nil, fmt.Errorf("%w: a head has exactly signed_seq, signed_hash and signature", ErrSyntax)
		}
		e.SignedSeq, e.SignedHash = *w.SignedSeq, *w.SignedHash
		if e.Signature, err = decodeB64(*w.Signature); err != nil {
			return nil, fmt.Errorf("%w: signature: %v", ErrSyntax, err)
		}
	default:
		return nil, fmt.Errorf("%w: kind %q: want genesis, decision or head", ErrSyntax, e.Kind)
	}
	return e, nil
}

// decodeB64 decodes standard padded base64, refusing any other spelling
// of the same bytes (so that the text is a function of the bytes).
func decodeB64(s string) ([]byte, error) {
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, err
	}
	if base64.StdEncoding.EncodeToString(b) != s {
		return nil, errors.New("not canonical base64")
	}
	return b, nil
}

// codeNames are the gRPC status code names (google.golang.org/grpc/codes).
var codeNames = map[string]bool{
	"OK": true, "Canceled": true, "Unknown": true, "InvalidArgument": true, "DeadlineExceeded": true,
	"NotFound": true, "AlreadyExists": true, "PermissionDenied": true, "ResourceExhausted": true,
	"FailedPrecondition": true, "Aborted": true, "OutOfRange": true, "Unimplemented": true,
	"Internal": true, "Unavailable": true, "DataLoss": true, "Unauthenticated": true,
}

// IsCodeName reports whether s is a gRPC status code name.
func IsCodeName(s string) bool { return codeNames[s] }

// Validate checks e's members as the package documentation specifies
// (formats, sizes, the rules of its kind), not its hash.
func (e *Entry) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrSyntax, fmt.Sprintf(format, a...))
	}
	if !isHex(e.Chain, 2*ChainBytes) {
		return bad("chain %s: want %d lowercase hex digits", clip(e.Chain), 2*ChainBytes)
	}
	if len(e.Time) != len(TimeLayout) {
		return bad("time %s: want %s", clip(e.Time), TimeLayout)
	}
	if _, err := time.Parse(TimeLayout, e.Time); err != nil {
		return bad("time %s: want %s", clip(e.Time), TimeLayout)
	}
	if !isHex(e.Prev, 2*sha256.Size) {
		return bad("prev: want %d lowercase hex digits", 2*sha256.Size)
	}
	if !isHex(e.Hash, 2*sha256.Size) {
		return bad("hash: want %d lowercase hex digits", 2*sha256.Size)
	}
	switch {
	case e.Seq == 0 && e.Kind != KindGenesis:
		return bad("seq 0 is a %s: seq 0 is the genesis", e.Kind)
	case e.Seq != 0 && e.Kind == KindGenesis:
		return bad("a genesis at seq %d: the genesis is seq 0", e.Seq)
	case e.Seq == 0 && e.Prev != ZeroHash:
		return bad("seq 0 with a prev: want %d zeros", len(ZeroHash))
	case e.Seq != 0 && e.Prev == ZeroHash:
		return bad("seq %d with a zero prev", e.Seq)
	}
	switch e.Kind {
	case KindGenesis:
		if _, err := AuditKey(e.AuditKey); err != nil {
			return bad("%v", err)
		}
		if len(e.Attestation) == 0 || len(e.Attestation) > MaxAttestation {
			return bad("attestation of %d bytes: want 1 to %d", len(e.Attestation), MaxAttestation)
		}
		if h := e.PreviousHead; h != nil && h.Validate() != nil {
			return bad("previous_head: want the chain, seq (> 0) and hash of a head")
		}
	case KindDecision:
		for _, f := range [...]struct{ name, v string }{
			{"caller", e.Caller}, {"caller_id", e.CallerID}, {"method", e.Method},
			{"key_id", e.KeyID}, {"algorithm", e.Algorithm}, {"reason", e.Reason},
		} {
			if len(f.v) > MaxText || !utf8.ValidString(f.v) {
				return bad("%s: want valid UTF-8 of at most %d bytes", f.name, MaxText)
			}
		}
		if !isHex(e.MessageSHA256, 2*sha256.Size) {
			return bad("message_sha256: want %d lowercase hex digits", 2*sha256.Size)
		}
		switch {
		case e.Outcome != OutcomeAllowed && e.Outcome != OutcomeDenied:
			return bad("outcome %s: want allowed or denied", clip(e.Outcome))
		case !IsCodeName(e.Code):
			return bad("code %s: want a gRPC status code name", clip(e.Code))
		case e.Outcome == OutcomeAllowed && e.Code != "OK":
			return bad("allowed with code %s: an allowed decision has code OK", e.Code)
		case e.Outcome == OutcomeDenied && e.Code == "OK":
			return bad("denied with code OK")
		}
	case KindHead:
		if e.SignedSeq+1 != e.Seq || e.SignedHash != e.Prev {
			return bad("head at seq %d signs seq %d: a head signs the entry just before it (seq-1, prev)", e.Seq, e.SignedSeq)
		}
		if len(e.Signature) != ed25519.SignatureSize {
			return bad("signature of %d bytes, want %d", len(e.Signature), ed25519.SignatureSize)
		}
	default:
		return bad("kind %s: want genesis, decision or head", clip(string(e.Kind)))
	}
	return nil
}

// isHex reports whether s is n lowercase hex digits.
func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 40 {
		s = s[:40] + "..."
	}
	return strconv.Quote(s)
}

// HeadOf names e (a head entry).
func HeadOf(e *Entry) Head { return Head{Chain: e.Chain, Seq: e.Seq, Hash: e.Hash} }

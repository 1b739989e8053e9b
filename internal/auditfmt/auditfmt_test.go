package auditfmt_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

// vectorChain builds the test vector: a fixed audit key (Ed25519 from a
// seed of 32 bytes 0x01), a fixed "attestation" (not a document: the
// format does not look inside), fixed times.
func vectorChain(t testing.TB) []*auditfmt.Entry {
	t.Helper()
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, ed25519.SeedSize))
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	chain := strings.Repeat("0f", auditfmt.ChainBytes)
	g := &auditfmt.Entry{Chain: chain, Seq: 0, Time: "2026-05-01T12:00:00.000000001Z", Kind: auditfmt.KindGenesis, Prev: auditfmt.ZeroHash,
		AuditKey: spki, Attestation: []byte("attestation document"),
		PreviousHead: &auditfmt.Head{Chain: strings.Repeat("ee", auditfmt.ChainBytes), Seq: 7, Hash: strings.Repeat("ab", 32)}}
	g.Hash, _ = g.ComputeHash(nil)
	msg := sha256.Sum256([]byte("hello"))
	d := &auditfmt.Entry{Chain: chain, Seq: 1, Time: "2026-05-01T12:00:00.500000000Z", Kind: auditfmt.KindDecision, Prev: g.Hash,
		Caller: "payments \"prod\"\n", CallerID: "c0ffee", Method: "/nitrosign.v1.SignerService/Sign", KeyID: "k1",
		Algorithm: "ECDSA_SHA_256", MessageSHA256: hex.EncodeToString(msg[:]), Outcome: "denied", Code: "PermissionDenied",
		Reason: "caller may not use key k1 — é"}
	d.Hash, _ = d.ComputeHash(nil)
	h := &auditfmt.Entry{Chain: chain, Seq: 2, Time: "2026-05-01T12:00:01.000000000Z", Kind: auditfmt.KindHead, Prev: d.Hash,
		SignedSeq: 1, SignedHash: d.Hash}
	h.Signature = ed25519.Sign(key, auditfmt.HeadMessage(chain, 1, d.Hash))
	h.Hash, _ = h.ComputeHash(nil)
	return []*auditfmt.Entry{g, d, h}
}

// The test vector a third-party verifier can check itself against:
// testdata/vector.jsonl, these entries as the encoder writes them, with
// their hashes. testdata/independent_check.py, written from the package
// documentation alone, verifies the same file (hashes, links, canonical
// JSON, the head's signature).
func TestCanonicalVector(t *testing.T) {
	want, err := os.ReadFile("testdata/vector.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	for _, e := range vectorChain(t) {
		got = append(e.AppendJSON(got), '\n')
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the encoder no longer writes the test vector:\n got %s\nwant %s", got, want)
	}
	hashes := []string{
		"eb3fa115f2d58a5cb6cedcd85cc28c8cac805c4942c9c942a8a05cb3003ab762",
		"42b923a5687aab5e6b625f404ae145161226da26dba21a67313768c14493d5ab",
		"afa5f482bde4e4a63cd0af5db8d9b400b600d560a009cd114af35b36931f6ac2",
	}
	for i, line := range bytes.SplitAfter(want, []byte("\n"))[:3] {
		e, err := auditfmt.Parse(bytes.TrimSuffix(line, []byte("\n")))
		if err != nil || e.Hash != hashes[i] {
			t.Errorf("line %d: %v, hash %v", i+1, err, e)
		}
	}
	// The canonical encoding itself, for the decision: the domain, then
	// length-prefixed names and values.
	d := vectorChain(t)[1]
	c := d.AppendCanonical(nil)
	if !bytes.HasPrefix(c, []byte("nitrosign-audit-entry-v1\n\x00\x00\x00\x05chain\x00\x00\x00\x20"+d.Chain+"\x00\x00\x00\x03seq\x00\x00\x00\x011")) ||
		!bytes.HasSuffix(c, []byte("\x00\x00\x00\x06reason\x00\x00\x00\x20"+d.Reason)) {
		t.Fatalf("canonical encoding %q", c)
	}
	if sum := sha256.Sum256(c); hex.EncodeToString(sum[:]) != d.Hash {
		t.Fatal("hash is not the SHA-256 of the canonical encoding")
	}
}

// Every kind goes through its line and back unchanged.
func TestRoundTrip(t *testing.T) {
	for _, e := range vectorChain(t) {
		line := e.AppendJSON(nil)
		got, err := auditfmt.Parse(line)
		if err != nil {
			t.Fatalf("%s: %v", e.Kind, err)
		}
		if !reflect.DeepEqual(got, e) {
			t.Fatalf("%s: got %+v\nwant %+v", e.Kind, got, e)
		}
	}
	// A genesis without a previous head: null, three empty fields.
	g := vectorChain(t)[0]
	g.PreviousHead = nil
	g.Hash, _ = g.ComputeHash(nil)
	line := g.AppendJSON(nil)
	if !bytes.Contains(line, []byte(`"previous_head":null`)) {
		t.Fatalf("line %s", line)
	}
	if !bytes.Contains(g.AppendCanonical(nil), []byte("\x00\x00\x00\x13previous_head.chain\x00\x00\x00\x00")) {
		t.Fatal("a null previous_head is not three empty fields")
	}
	if got, err := auditfmt.Parse(line); err != nil || got.PreviousHead != nil {
		t.Fatalf("%v, %+v", err, got)
	}
}

// The head's signature covers the documented message.
func TestHeadSignature(t *testing.T) {
	es := vectorChain(t)
	key, err := auditfmt.AuditKey(es[0].AuditKey)
	if err != nil {
		t.Fatal(err)
	}
	h := es[2]
	if got := string(auditfmt.HeadMessage(h.Chain, 1, h.SignedHash)); got != "nitrosign-audit-head-v1\n"+h.Chain+"\n1\n"+h.SignedHash {
		t.Fatalf("message %q", got)
	}
	if !auditfmt.VerifyHead(key, h) {
		t.Fatal("the vector's head does not verify")
	}
	h2 := *h
	h2.SignedSeq = 0
	if auditfmt.VerifyHead(key, &h2) {
		t.Fatal("a head verifies for another seq")
	}
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, 32)).Public().(ed25519.PublicKey)
	if auditfmt.VerifyHead(other, h) {
		t.Fatal("a head verifies with another key")
	}
}

// Parse is strict: everything but what the encoder writes for a valid
// entry is refused, with the error that says why.
func TestParseRefuses(t *testing.T) {
	es := vectorChain(t)
	g, d, h := string(es[0].AppendJSON(nil)), string(es[1].AppendJSON(nil)), string(es[2].AppendJSON(nil))
	// resealed edits d's members and recomputes its hash, so that only
	// the edited rule fails.
	resealed := func(base *auditfmt.Entry, edit func(*auditfmt.Entry)) string {
		e := *base
		edit(&e)
		e.Hash, _ = e.ComputeHash(nil)
		return string(e.AppendJSON(nil))
	}
	for _, tt := range []struct {
		name, line string
		want       error
	}{
		{"empty", "", auditfmt.ErrSyntax},
		{"not JSON", "hello", auditfmt.ErrSyntax},
		{"an array", "[1,2]", auditfmt.ErrSyntax},
		{"invalid UTF-8", strings.Replace(d, "é", "\xff", 1), auditfmt.ErrSyntax},
		{"two objects", d + d, auditfmt.ErrSyntax},
		{"unknown member", strings.Replace(d, `{"chain"`, `{"x":1,"chain"`, 1), auditfmt.ErrSyntax},
		{"no hash", d[:strings.Index(d, `,"hash"`)] + "}", auditfmt.ErrSyntax},
		{"decision without reason", strings.Replace(d, `,"reason":"caller may not use key k1 — é"`, "", 1), auditfmt.ErrSyntax},
		{"decision with a signature", strings.Replace(d, `,"hash"`, `,"signature":"AA==","hash"`, 1), auditfmt.ErrSyntax},
		{"head with a caller", strings.Replace(h, `,"hash"`, `,"caller":"x","hash"`, 1), auditfmt.ErrSyntax},
		{"unknown kind", resealed(es[1], func(e *auditfmt.Entry) { e.Kind = "note" }), auditfmt.ErrSyntax},
		{"negative seq", strings.Replace(d, `"seq":1`, `"seq":-1`, 1), auditfmt.ErrSyntax},
		{"seq as a float", strings.Replace(d, `"seq":1`, `"seq":1.0`, 1), auditfmt.ErrSyntax},
		{"seq as a string", strings.Replace(d, `"seq":1`, `"seq":"1"`, 1), auditfmt.ErrSyntax},
		{"uppercase chain", resealed(es[1], func(e *auditfmt.Entry) { e.Chain = strings.ToUpper(e.Chain) }), auditfmt.ErrSyntax},
		{"short prev", resealed(es[1], func(e *auditfmt.Entry) { e.Prev = e.Prev[:10] }), auditfmt.ErrSyntax},
		{"local time", resealed(es[1], func(e *auditfmt.Entry) { e.Time = "2026-05-01T14:00:00.500000000+02:00" }), auditfmt.ErrSyntax},
		{"time without nanoseconds", resealed(es[1], func(e *auditfmt.Entry) { e.Time = "2026-05-01T12:00:00Z" }), auditfmt.ErrSyntax},
		{"a decision at seq 0", resealed(es[1], func(e *auditfmt.Entry) { e.Seq, e.Prev = 0, auditfmt.ZeroHash }), auditfmt.ErrSyntax},
		{"a genesis at seq 1", resealed(es[0], func(e *auditfmt.Entry) { e.Seq, e.Prev = 1, es[0].Hash }), auditfmt.ErrSyntax},
		{"zero prev at seq 1", resealed(es[1], func(e *auditfmt.Entry) { e.Prev = auditfmt.ZeroHash }), auditfmt.ErrSyntax},
		{"allowed but denied", resealed(es[1], func(e *auditfmt.Entry) { e.Outcome = "allowed" }), auditfmt.ErrSyntax},
		{"denied with OK", resealed(es[1], func(e *auditfmt.Entry) { e.Code = "OK" }), auditfmt.ErrSyntax},
		{"unknown outcome", resealed(es[1], func(e *auditfmt.Entry) { e.Outcome = "maybe" }), auditfmt.ErrSyntax},
		{"unknown code", resealed(es[1], func(e *auditfmt.Entry) { e.Code = "PERMISSION_DENIED" }), auditfmt.ErrSyntax},
		{"message hash too short", resealed(es[1], func(e *auditfmt.Entry) { e.MessageSHA256 = "abcd" }), auditfmt.ErrSyntax},
		{"a message instead of its hash", resealed(es[1], func(e *auditfmt.Entry) { e.MessageSHA256 = "hello" }), auditfmt.ErrSyntax},
		{"reason too long", resealed(es[1], func(e *auditfmt.Entry) { e.Reason = strings.Repeat("r", auditfmt.MaxText+1) }), auditfmt.ErrSyntax},
		{"head signing another seq", resealed(es[2], func(e *auditfmt.Entry) { e.SignedSeq = 0 }), auditfmt.ErrSyntax},
		{"head signing another hash", resealed(es[2], func(e *auditfmt.Entry) { e.SignedHash = es[0].Hash }), auditfmt.ErrSyntax},
		{"short signature", resealed(es[2], func(e *auditfmt.Entry) { e.Signature = e.Signature[:10] }), auditfmt.ErrSyntax},
		{"audit key not Ed25519", resealed(es[0], func(e *auditfmt.Entry) { e.AuditKey = []byte("not a key") }), auditfmt.ErrSyntax},
		{"empty attestation", resealed(es[0], func(e *auditfmt.Entry) { e.Attestation = nil }), auditfmt.ErrSyntax},
		{"previous head of seq 0", resealed(es[0], func(e *auditfmt.Entry) { e.PreviousHead = &auditfmt.Head{Chain: e.Chain, Seq: 0, Hash: e.Prev} }), auditfmt.ErrSyntax},
		{"previous head without hash", strings.Replace(g, `,"hash":"abab`, `,"hosh":"abab`, 1), auditfmt.ErrSyntax},
		{"unpadded base64", strings.Replace(g, `"YXR0ZXN0YXRpb24gZG9jdW1lbnQ="`, `"YXR0ZXN0YXRpb24gZG9jdW1lbnQ"`, 1), auditfmt.ErrSyntax},
		{"base64 with a newline", strings.Replace(g, `"YXR0ZXN0YXRp`, `"YXR0ZXN0\nYXRp`, 1), auditfmt.ErrSyntax},
		{"edited key id", strings.Replace(d, `"key_id":"k1"`, `"key_id":"k2"`, 1), auditfmt.ErrHash},
		{"edited outcome", strings.Replace(strings.Replace(d, `"denied"`, `"allowed"`, 1), `"PermissionDenied"`, `"OK"`, 1), auditfmt.ErrHash},
		{"edited hash", strings.Replace(d, `"hash":"42b9`, `"hash":"52b9`, 1), auditfmt.ErrHash},
		{"a space", strings.Replace(d, `"seq":1`, `"seq": 1`, 1), auditfmt.ErrNotCanonical},
		{"members reordered", strings.Replace(d, `"chain":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","seq":1`, `"seq":1,"chain":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"`, 1), auditfmt.ErrNotCanonical},
		{"a needless escape", strings.Replace(d, `"key_id":"k1"`, `"key_id":"\u006b1"`, 1), auditfmt.ErrNotCanonical},
		{"member twice", strings.Replace(d, `{"chain"`, `{"key_id":"kX","chain"`, 1), auditfmt.ErrNotCanonical},
		{"member in another case", strings.Replace(d, `"key_id"`, `"KEY_ID"`, 1), auditfmt.ErrNotCanonical},
		{"too long", d + strings.Repeat(" ", auditfmt.MaxLine), auditfmt.ErrSyntax},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := auditfmt.Parse([]byte(tt.line))
			if !errors.Is(err, tt.want) {
				t.Fatalf("Parse: %v, want %v", err, tt.want)
			}
			for _, other := range []error{auditfmt.ErrSyntax, auditfmt.ErrHash, auditfmt.ErrNotCanonical} {
				if other != tt.want && errors.Is(err, other) {
					t.Fatalf("Parse: %v wraps %v too", err, other)
				}
			}
		})
	}
}

// Text with every kind of character goes through JSON and back to the
// same hash: what the encoder escapes, a decoder unescapes.
func TestTextEscaping(t *testing.T) {
	var all strings.Builder
	for r := rune(0); r < 0x80; r++ {
		all.WriteRune(r)
	}
	for _, s := range []string{all.String(), "\u2028\u2029 <>& \x7f", "日本語 🙂", "\\\"\\n"} {
		d := vectorChain(t)[1]
		d.Reason = s
		if len(s) > auditfmt.MaxText {
			d.Reason = s[:auditfmt.MaxText]
		}
		d.Hash, _ = d.ComputeHash(nil)
		got, err := auditfmt.Parse(d.AppendJSON(nil))
		if err != nil || got.Reason != d.Reason {
			t.Fatalf("%q: %v, %q", s, err, got.Reason)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, e := range vectorChain(f) {
		f.Add(e.AppendJSON(nil))
	}
	f.Add([]byte(`{"chain":"`))
	f.Fuzz(func(t *testing.T, line []byte) {
		e, err := auditfmt.Parse(line)
		if err == nil && !bytes.Equal(e.AppendJSON(nil), line) {
			t.Fatalf("accepted a line the encoder does not write: %q", line)
		}
		if err != nil && e == nil && !errors.Is(err, auditfmt.ErrSyntax) {
			t.Fatalf("no entry and not a syntax error: %v", err)
		}
	})
}

// Any text the enclave may put in a decision (valid UTF-8, cut to
// MaxText) parses back to itself.
func FuzzDecisionText(f *testing.F) {
	f.Add("caller", "reason")
	f.Add("\x00\x1f\"\\", "é🙂")
	f.Fuzz(func(t *testing.T, caller, reason string) {
		if !utf8.ValidString(caller) || !utf8.ValidString(reason) || len(caller) > auditfmt.MaxText || len(reason) > auditfmt.MaxText {
			return
		}
		d := vectorChain(t)[1]
		d.Caller, d.Reason = caller, reason
		d.Hash, _ = d.ComputeHash(nil)
		got, err := auditfmt.Parse(d.AppendJSON(nil))
		if err != nil || got.Caller != caller || got.Reason != reason || got.Hash != d.Hash {
			t.Fatalf("%q %q: %v", caller, reason, err)
		}
	})
}

// FormatTime writes what time.Format writes with TimeLayout.
func TestFormatTime(t *testing.T) {
	for _, tm := range []time.Time{
		time.Unix(0, 0), time.Unix(0, 1), time.Date(2026, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(2026, 5, 1, 14, 0, 0, 5, time.FixedZone("x", 2*3600)), time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), time.Now(),
	} {
		if got, want := auditfmt.FormatTime(tm), tm.UTC().Format(auditfmt.TimeLayout); got != want {
			t.Errorf("FormatTime(%v) = %s, want %s", tm, got, want)
		}
	}
}

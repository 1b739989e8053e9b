package callauth

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func newSealer(t testing.TB) *TicketSealer {
	t.Helper()
	key := make([]byte, TicketKeyLen)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	s, err := NewTicketSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// startSession runs both halves of OpenSession in process.
func startSession(t testing.TB, id *Identity, sealer *TicketSealer, now time.Time, lifetime time.Duration) *Session {
	t.Helper()
	offer, err := NewSessionOffer()
	if err != nil {
		t.Fatal(err)
	}
	share, tk, expiry, err := AcceptSession(sealer, id.KeyID(), offer.Share(), now, lifetime)
	if err != nil {
		t.Fatal(err)
	}
	s, err := offer.Finish(id.KeyID(), share, tk, expiry)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func verifySession(md metadata.MD, sealer *TicketSealer, method string, msg []byte, now time.Time) error {
	c, err := ParseMetadata(md)
	if err != nil {
		return err
	}
	return c.VerifySession(sealer, method, sha256.Sum256(msg), now)
}

func TestSessionCall(t *testing.T) {
	id := newID(t, TypeEd25519)
	sealer := newSealer(t)
	now := time.Now()
	s := startSession(t, id, sealer, now, time.Hour)
	if got := s.Expiry(); got.Sub(now) < time.Hour-time.Millisecond || got.Sub(now) > time.Hour {
		t.Fatalf("expiry %v, want an hour after %v", got, now)
	}
	msg := []byte("request bytes")
	md, err := s.Authenticate(testMethod, msg, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{MDCaller, MDTimestamp, MDNonce, MDSession, MDMAC} {
		if len(md[k]) != 1 {
			t.Fatalf("%s: %q", k, md[k])
		}
	}
	if _, ok := md[MDSignature]; ok {
		t.Fatal("a session call carries a signature")
	}
	c, err := ParseMetadata(md)
	if err != nil || !c.IsSession() {
		t.Fatalf("ParseMetadata = %v, session %v", err, c != nil && c.IsSession())
	}
	if err := c.VerifySession(sealer, testMethod, sha256.Sum256(msg), now); err != nil {
		t.Fatal(err)
	}
	// The MAC is HMAC-SHA256 of MACedBytes under the session key.
	want, err := MACedBytes(testMethod, msg, id.KeyID(), now.UnixMilli(), md[MDNonce][0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(want, []byte(SessionDomain+"\n")) {
		t.Fatalf("MACed bytes %q", want)
	}
	h := hmac.New(sha256.New, s.key[:])
	h.Write(want)
	if !hmac.Equal(h.Sum(nil), []byte(md[MDMAC][0])) {
		t.Fatal("the MAC is not HMAC-SHA256(session key, MACedBytes)")
	}
	// A session call is no signed call: Verify refuses it.
	if err := c.Verify(id.Public(), testMethod, msg); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("Verify of a session call = %v", err)
	}
}

func TestSessionCallRefused(t *testing.T) {
	id, other := newID(t, TypeEd25519), newID(t, TypeP256)
	sealer := newSealer(t)
	now := time.Now()
	s := startSession(t, id, sealer, now, time.Hour)
	msg := []byte("request bytes")
	good, err := s.Authenticate(testMethod, msg, now)
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(md metadata.MD)) metadata.MD {
		md := good.Copy()
		f(md)
		return md
	}
	flip := func(s string, i int) string {
		b := []byte(s)
		b[i] ^= 1
		return string(b)
	}
	for _, tc := range []struct {
		name   string
		md     metadata.MD
		sealer *TicketSealer
		method string
		msg    []byte
		now    time.Time
		want   error
	}{
		{name: "another body", md: good, msg: []byte("request byteS"), want: ErrBadSignature},
		{name: "another method", md: good, method: "/nitrosign.v1.KeyAdminService/CreateKey", want: ErrBadSignature},
		{name: "MAC changed", md: edit(func(md metadata.MD) { md[MDMAC] = []string{flip(md[MDMAC][0], 3)} }), want: ErrBadSignature},
		{name: "timestamp changed", md: edit(func(md metadata.MD) { md[MDTimestamp] = []string{"1"} }), want: ErrBadSignature},
		{name: "nonce changed", md: edit(func(md metadata.MD) { md[MDNonce] = []string{strings.Repeat("0", NonceLen)} }), want: ErrBadSignature},
		{name: "another caller named", md: edit(func(md metadata.MD) { md[MDCaller] = []string{other.KeyID()} }), want: ErrBadSignature},
		{name: "ticket altered", md: edit(func(md metadata.MD) { md[MDSession] = []string{flip(md[MDSession][0], 40)} }), want: ErrSessionInvalid},
		{name: "ticket version", md: edit(func(md metadata.MD) { md[MDSession] = []string{flip(md[MDSession][0], 0)} }), want: ErrSessionInvalid},
		{name: "another enclave's keys", md: good, sealer: newSealer(t), want: ErrSessionInvalid},
		{name: "expired", md: good, now: now.Add(time.Hour), want: ErrSessionInvalid},
		{name: "no ticket key", md: good, sealer: (*TicketSealer)(nil), want: ErrSessionInvalid},
		{name: "signature and session", md: edit(func(md metadata.MD) { md[MDSignature] = []string{"x"} }), want: ErrMalformed},
		{name: "MAC missing", md: edit(func(md metadata.MD) { delete(md, MDMAC) }), want: ErrMalformed},
		{name: "ticket missing", md: edit(func(md metadata.MD) { delete(md, MDSession) }), want: ErrMalformed},
		{name: "short MAC", md: edit(func(md metadata.MD) { md[MDMAC] = []string{md[MDMAC][0][:31]} }), want: ErrMalformed},
		{name: "long ticket", md: edit(func(md metadata.MD) { md[MDSession] = []string{md[MDSession][0] + "x"} }), want: ErrMalformed},
		{name: "two MACs", md: edit(func(md metadata.MD) { md[MDMAC] = append(md[MDMAC], md[MDMAC][0]) }), want: ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sl, method, m, at := sealer, testMethod, msg, now
			if tc.sealer != nil || tc.name == "no ticket key" {
				sl = tc.sealer
			}
			if tc.method != "" {
				method = tc.method
			}
			if tc.msg != nil {
				m = tc.msg
			}
			if !tc.now.IsZero() {
				at = tc.now
			}
			err := verifySession(tc.md, sl, method, m, at)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			for _, secret := range []string{hex.EncodeToString(s.key[:]), string(s.key[:])} {
				if err != nil && strings.Contains(err.Error(), secret) {
					t.Fatal("the error quotes the session key")
				}
			}
		})
	}
}

// A ticket names its caller: another caller cannot use a ticket it
// recorded, even with a MAC of its own making (it has no session key).
func TestTicketBoundToCaller(t *testing.T) {
	alice, mallory := newID(t, TypeEd25519), newID(t, TypeEd25519)
	sealer := newSealer(t)
	now := time.Now()
	sa := startSession(t, alice, sealer, now, time.Hour)
	sm := startSession(t, mallory, sealer, now, time.Hour)
	// Mallory's session key, Alice's ticket and name.
	forged := &Session{caller: alice.KeyID(), key: sm.key, ticket: sa.ticket, expiry: sa.expiry}
	md, err := forged.Authenticate(testMethod, nil, now)
	if err != nil {
		t.Fatal(err)
	}
	if err := verifySession(md, sealer, testMethod, nil, now); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("Alice's ticket with Mallory's key = %v", err)
	}
	// Mallory's ticket and key, Alice's name.
	forged = &Session{caller: alice.KeyID(), key: sm.key, ticket: sm.ticket, expiry: sm.expiry}
	if md, err = forged.Authenticate(testMethod, nil, now); err != nil {
		t.Fatal(err)
	}
	if err := verifySession(md, sealer, testMethod, nil, now); !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), "opened by caller "+mallory.KeyID()) {
		t.Fatalf("Mallory's ticket under Alice's name = %v", err)
	}
}

// Both sides must agree on the shares, the caller and the expiry: a
// change of any gives another key, so the enclave refuses every call.
func TestSessionKeyBinding(t *testing.T) {
	id := newID(t, TypeEd25519)
	sealer := newSealer(t)
	now := time.Now()
	offer, err := NewSessionOffer()
	if err != nil {
		t.Fatal(err)
	}
	share, tk, expiry, err := AcceptSession(sealer, id.KeyID(), offer.Share(), now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := NewSessionOffer()
	if err != nil {
		t.Fatal(err)
	}
	for name, finish := range map[string]func() (*Session, error){
		"expiry":        func() (*Session, error) { return offer.Finish(id.KeyID(), share, tk, expiry.Add(time.Millisecond)) },
		"enclave share": func() (*Session, error) { return offer.Finish(id.KeyID(), other.Share(), tk, expiry) },
	} {
		s, err := finish()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		md, err := s.Authenticate(testMethod, nil, now)
		if err != nil {
			t.Fatal(err)
		}
		if err := verifySession(md, sealer, testMethod, nil, now); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s changed: %v", name, err)
		}
	}
	if _, err := offer.Finish(id.KeyID(), share[:31], tk, expiry); err == nil {
		t.Error("Finish took a short share")
	}
	if _, err := offer.Finish(id.KeyID(), share, tk[1:], expiry); err == nil {
		t.Error("Finish took a short ticket")
	}
	for _, bad := range [][]byte{nil, make([]byte, 31), make([]byte, 32)} {
		// Nothing, a short key, the all-zero (low-order) point.
		if _, _, _, err := AcceptSession(sealer, id.KeyID(), bad, now, time.Hour); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("AcceptSession(%d bytes) = %v", len(bad), err)
		}
	}
	if _, _, _, err := AcceptSession(sealer, "alice", offer.Share(), now, time.Hour); !errors.Is(err, ErrInvalidInput) {
		t.Errorf("AcceptSession for a caller that is no key id = %v", err)
	}
	if _, err := NewTicketSealer(make([]byte, 16)); err == nil {
		t.Error("NewTicketSealer took a 16-byte key")
	}
}

func TestSessionInvalidStatus(t *testing.T) {
	err := SessionInvalidStatus("caller x: expired").Err()
	if status.Code(err) != codes.Unauthenticated || !IsSessionInvalid(err) {
		t.Fatalf("%v: code %v, IsSessionInvalid %v", err, status.Code(err), IsSessionInvalid(err))
	}
	for _, other := range []error{nil, errors.New("x"), status.Error(codes.Unauthenticated, "bad signature"), status.Error(codes.PermissionDenied, "no")} {
		if IsSessionInvalid(other) {
			t.Errorf("IsSessionInvalid(%v)", other)
		}
	}
}

// BenchmarkVerifySession is the enclave's check of one session call, the
// replay cache aside: ParseMetadata, the request's SHA-256, opening the
// ticket and the MAC (set beside BenchmarkVerifyEd25519 and
// BenchmarkSignECDSAP256).
func BenchmarkVerifySession(b *testing.B) {
	id := newID(b, TypeEd25519)
	sealer := newSealer(b)
	now := time.Now()
	s := startSession(b, id, sealer, now, time.Hour)
	msg := benchRequest(b)
	md, err := s.Authenticate(testMethod, msg, now)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := verifySession(md, sealer, testMethod, msg, now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpenSession is what opening a session costs the enclave beyond
// the signature check of the OpenSession call: an X25519 key and shared
// secret, HKDF and sealing the ticket.
func BenchmarkOpenSession(b *testing.B) {
	id := newID(b, TypeEd25519)
	sealer := newSealer(b)
	offer, err := NewSessionOffer()
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if _, _, _, err := AcceptSession(sealer, id.KeyID(), offer.Share(), now, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

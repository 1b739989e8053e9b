package callauth

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
)

// The syntax of the entries, written independently of the parser, from
// the package documentation.
var (
	reCaller    = regexp.MustCompile(`\A[0-9a-f]{64}\z`)
	reTimestamp = regexp.MustCompile(`\A(0|[1-9][0-9]{0,14})\z`)
	reNonce     = regexp.MustCompile(`\A[0-9a-f]{32}\z`)
)

// FuzzParseMetadata: ParseMetadata accepts exactly the metadata the
// documentation allows (each entry once, each well formed), refuses the
// rest with ErrMissing (none of the entries) or ErrMalformed (anything
// else), and never panics. shape says which entries are present (bits 0-3)
// and which are repeated (bits 4-7).
func FuzzParseMetadata(f *testing.F) {
	caller, nonce := strings.Repeat("0a", 32), strings.Repeat("f1", 16)
	f.Add(caller, "1767225600000", nonce, bytes.Repeat([]byte{1}, 64), uint8(0x0f))
	f.Add(caller, "0", nonce, []byte{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01}, uint8(0x0f))
	f.Add(caller, "01", nonce, []byte{1}, uint8(0x0f))
	f.Add(caller, "999999999999999", nonce, bytes.Repeat([]byte{1}, 80), uint8(0x0f))
	f.Add(caller, "1000000000000000", nonce, bytes.Repeat([]byte{1}, 81), uint8(0x0f))
	f.Add(strings.ToUpper(caller), "1", nonce, []byte{1}, uint8(0x0f))
	f.Add(caller, "1", nonce, []byte{1}, uint8(0x1f))
	f.Add(caller, "1", nonce, []byte{1}, uint8(0x07))
	f.Add(caller, "1", nonce, []byte{}, uint8(0x00))
	f.Add(caller[:63]+"\n", "-1", nonce+"0", []byte{}, uint8(0xff))
	f.Fuzz(func(t *testing.T, caller, ts, nonce string, sig []byte, shape uint8) {
		values := [4]string{caller, ts, nonce, string(sig)}
		names := [4]string{MDCaller, MDTimestamp, MDNonce, MDSignature}
		md := metadata.MD{"x-unrelated": {caller}}
		valid := true
		for i, name := range names {
			if shape&(1<<i) == 0 {
				valid = false
				continue
			}
			md[name] = []string{values[i]}
			if shape&(1<<(4+i)) != 0 {
				md[name] = append(md[name], values[i])
				valid = false
			}
		}
		valid = valid && reCaller.MatchString(caller) && reTimestamp.MatchString(ts) &&
			reNonce.MatchString(nonce) && len(sig) >= 1 && len(sig) <= MaxSignatureLen

		c, err := ParseMetadata(md)
		switch {
		case valid && err != nil:
			t.Fatalf("valid metadata refused: %v", err)
		case !valid && err == nil:
			t.Fatalf("invalid metadata accepted: %q", md)
		case err != nil && shape&0x0f == 0 && !errors.Is(err, ErrMissing):
			t.Fatalf("no entry, error %v does not wrap ErrMissing", err)
		case err != nil && shape&0x0f != 0 && (!errors.Is(err, ErrMalformed) || errors.Is(err, ErrMissing)):
			t.Fatalf("some entries, error %v does not wrap ErrMalformed only", err)
		case err != nil:
			return
		}
		if c.Caller() != caller || c.Nonce() != nonce || strconv.FormatInt(c.TimestampMillis(), 10) != ts || !bytes.Equal(c.sig[:c.sigLen], sig) {
			t.Fatalf("claims differ from the metadata: %q %q %d %x", c.Caller(), c.Nonce(), c.TimestampMillis(), c.sig[:c.sigLen])
		}
	})
}

// decodeSigned splits signed bytes back into their fields, as a verifier
// of the format could: exactly six lines, the first the domain.
func decodeSigned(b []byte) (method, sum, caller, ts, nonce string, ok bool) {
	parts := strings.Split(string(b), "\n")
	if len(parts) != 6 || parts[0] != Domain {
		return "", "", "", "", "", false
	}
	return parts[1], parts[2], parts[3], parts[4], parts[5], true
}

// FuzzCanonical: the signed bytes are never ambiguous. Whatever SignedBytes
// accepts decodes back, line by line, into the very fields it was given;
// a field with a newline is refused; and two inputs give the same bytes
// exactly when their method, message digest, caller, timestamp and nonce
// are all equal.
func FuzzCanonical(f *testing.F) {
	caller, nonce := strings.Repeat("ab", 32), strings.Repeat("01", 16)
	other := strings.Repeat("cd", 32)
	m := "/nitrosign.v1.SignerService/Sign"
	f.Add(m, []byte("abc"), caller, int64(1767225600000), nonce, m, []byte("abc"), caller, int64(1767225600000), nonce)
	f.Add(m, []byte("abc"), caller, int64(1767225600000), nonce, m, []byte("abd"), caller, int64(1767225600000), nonce)
	f.Add(m, []byte{}, caller, int64(0), nonce, m+"\n"+caller, []byte{}, caller, int64(0), nonce)
	f.Add(m, []byte("x"), caller, int64(12), nonce, m, []byte("x"), caller, int64(1), "2"+nonce[1:])
	f.Add(m, []byte("x"), caller, int64(1), nonce, m+"x", []byte("x"), caller, int64(1), nonce)
	f.Add(m, []byte("x"), caller, int64(1), nonce, m, []byte("x"), other, int64(1), nonce)
	f.Add(m+"\n", []byte("x"), caller, int64(-5), nonce+"\n", "/", []byte(nil), caller+"\n", int64(maxTimestamp+1), nonce)
	f.Fuzz(func(t *testing.T, m1 string, msg1 []byte, c1 string, t1 int64, n1 string, m2 string, msg2 []byte, c2 string, t2 int64, n2 string) {
		b1, err1 := SignedBytes(m1, msg1, c1, t1, n1)
		b2, err2 := SignedBytes(m2, msg2, c2, t2, n2)
		for _, in := range []struct {
			m, c, n string
			ts      int64
			msg, b  []byte
			err     error
		}{{m1, c1, n1, t1, msg1, b1, err1}, {m2, c2, n2, t2, msg2, b2, err2}} {
			if strings.Contains(in.m+in.c+in.n, "\n") && in.err == nil {
				t.Fatalf("a field with a newline accepted: %q", in.b)
			}
			if in.err != nil {
				if !errors.Is(in.err, ErrInvalidInput) {
					t.Fatalf("error %v does not wrap ErrInvalidInput", in.err)
				}
				continue
			}
			// A session call's MACed bytes are the same fields under
			// SessionDomain.
			macd, err := MACedBytes(in.m, in.msg, in.c, in.ts, in.n)
			if err != nil || !bytes.Equal(macd, append([]byte(SessionDomain), in.b[len(Domain):]...)) {
				t.Fatalf("MACedBytes %q (%v), signed bytes %q", macd, err, in.b)
			}
			sum := sha256.Sum256(in.msg)
			m, s, c, ts, n, ok := decodeSigned(in.b)
			if !ok || m != in.m || s != hex.EncodeToString(sum[:]) || c != in.c || ts != strconv.FormatInt(in.ts, 10) || n != in.n {
				t.Fatalf("%q does not decode back into its fields", in.b)
			}
		}
		if err1 != nil || err2 != nil {
			return
		}
		same := m1 == m2 && sha256.Sum256(msg1) == sha256.Sum256(msg2) && c1 == c2 && t1 == t2 && n1 == n2
		if same != bytes.Equal(b1, b2) {
			t.Fatalf("inputs equal: %v, signed bytes equal: %v:\n%q\n%q", same, !same, b1, b2)
		}
	})
}

// FuzzParseSessionMetadata: with the session entries, ParseMetadata
// accepts exactly the metadata the documentation allows (caller,
// timestamp and nonce, then either a signature or a ticket and a MAC,
// each once and well formed), refuses the rest with ErrMissing or
// ErrMalformed, and never panics; a session call it accepts is then
// verified, which succeeds only for the one real session call of the
// seed (with any byte of its ticket or MAC changed, it does not), and
// refuses anything else with ErrSessionInvalid or ErrBadSignature. shape says which entries are present (bits 0-5:
// caller, timestamp, nonce, signature, ticket, MAC) and which are repeated
// (bits 8-13).
func FuzzParseSessionMetadata(f *testing.F) {
	id := newID(f, TypeEd25519)
	sealer, err := NewTicketSealer(bytes.Repeat([]byte{7}, TicketKeyLen))
	if err != nil {
		f.Fatal(err)
	}
	now := time.UnixMilli(1767225600000)
	s := startSession(f, id, sealer, now, time.Hour)
	seedCall, err := s.Authenticate(testMethod, nil, now)
	if err != nil {
		f.Fatal(err)
	}
	caller, ts, nonce := seedCall[MDCaller][0], seedCall[MDTimestamp][0], seedCall[MDNonce][0]
	tk, mac := []byte(seedCall[MDSession][0]), []byte(seedCall[MDMAC][0])
	f.Add(caller, ts, nonce, []byte{}, tk, mac, uint16(0x37))
	f.Add(caller, ts, nonce, bytes.Repeat([]byte{1}, 64), tk, mac, uint16(0x3f))
	f.Add(caller, ts, nonce, []byte{}, tk[:TicketLen-1], mac, uint16(0x37))
	f.Add(caller, ts, nonce, []byte{}, tk, mac[:MACLen-1], uint16(0x37))
	f.Add(caller, ts, nonce, []byte{}, tk, mac, uint16(0x1037))
	f.Add(caller, ts, nonce, []byte{}, bytes.Repeat([]byte{1}, TicketLen), mac, uint16(0x37))
	f.Add(caller, ts, nonce, []byte{}, tk, mac, uint16(0x17))
	f.Add(caller, ts, nonce, []byte{}, tk, mac, uint16(0x30))
	f.Fuzz(func(t *testing.T, caller, ts, nonce string, sig, tk, mac []byte, shape uint16) {
		values := [6]string{caller, ts, nonce, string(sig), string(tk), string(mac)}
		names := [6]string{MDCaller, MDTimestamp, MDNonce, MDSignature, MDSession, MDMAC}
		md := metadata.MD{}
		once := [6]bool{}
		for i, name := range names {
			if shape&(1<<i) == 0 {
				continue
			}
			md[name] = []string{values[i]}
			once[i] = shape&(1<<(8+i)) == 0
			if !once[i] {
				md[name] = append(md[name], values[i])
			}
		}
		present := shape & 0x3f
		common := once[0] && once[1] && once[2] && reCaller.MatchString(caller) && reTimestamp.MatchString(ts) && reNonce.MatchString(nonce)
		signed := present&0x38 == 0x08 && once[3] && len(sig) >= 1 && len(sig) <= MaxSignatureLen
		session := present&0x38 == 0x30 && once[4] && once[5] && len(tk) == TicketLen && len(mac) == MACLen
		valid := common && (signed || session)

		c, err := ParseMetadata(md)
		switch {
		case valid && err != nil:
			t.Fatalf("valid metadata refused: %v", err)
		case !valid && err == nil:
			t.Fatalf("invalid metadata accepted: %q", md)
		case err != nil && present == 0 && !errors.Is(err, ErrMissing):
			t.Fatalf("no entry, error %v does not wrap ErrMissing", err)
		case err != nil && present != 0 && (!errors.Is(err, ErrMalformed) || errors.Is(err, ErrMissing)):
			t.Fatalf("some entries, error %v does not wrap ErrMalformed only", err)
		case err != nil:
			return
		}
		if c.IsSession() != session {
			t.Fatalf("IsSession %v, want %v", c.IsSession(), session)
		}
		if !session {
			return
		}
		err = c.VerifySession(sealer, testMethod, sha256.Sum256(nil), now)
		if err != nil {
			if !errors.Is(err, ErrSessionInvalid) && !errors.Is(err, ErrBadSignature) {
				t.Fatalf("error %v wraps neither ErrSessionInvalid nor ErrBadSignature", err)
			}
			return
		}
		// A call that verifies (the seed's real one): any one byte of its
		// MAC or ticket changed, it does not.
		for i := range len(tk) + len(mac) {
			md := md.Copy()
			if i < len(tk) {
				b := bytes.Clone(tk)
				b[i] ^= 0x80
				md[MDSession] = []string{string(b)}
			} else {
				b := bytes.Clone(mac)
				b[i-len(tk)] ^= 0x80
				md[MDMAC] = []string{string(b)}
			}
			c, err := ParseMetadata(md)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.VerifySession(sealer, testMethod, sha256.Sum256(nil), now); err == nil {
				t.Fatalf("byte %d changed, the call still verifies", i)
			}
		}
	})
}

package callauth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc/metadata"
)

// The metadata entries of a signed call (see the package documentation).
const (
	MDCaller    = "nitrosign-caller"
	MDTimestamp = "nitrosign-timestamp"
	MDNonce     = "nitrosign-nonce"
	MDSignature = "nitrosign-signature-bin"
)

// Domain is the first line of the signed bytes, version 1 of the format.
const Domain = "nitrosign-call-v1"

// Sizes and bounds of the fields (see the package documentation).
const (
	// CallerIDLen is the length of a key id: hex SHA-256.
	CallerIDLen = 2 * sha256.Size
	// NonceLen is the length of a nonce: 16 bytes in hex.
	NonceLen = 32
	// MaxTimestampDigits bounds the timestamp: 15 digits of milliseconds
	// reach the year 33658.
	MaxTimestampDigits = 15
	// MaxSignatureLen bounds the signature: an Ed25519 signature is 64
	// bytes, an ECDSA P-256 one in DER at most 72.
	MaxSignatureLen = 80
	// MinMethodLen and MaxMethodLen bound the method name.
	MinMethodLen = 2
	MaxMethodLen = 256
)

// maxTimestamp is the largest timestamp of MaxTimestampDigits digits.
const maxTimestamp = 999_999_999_999_999

var (
	// ErrMissing is wrapped when a call carries none of the four entries:
	// an anonymous call.
	ErrMissing = errors.New("callauth: no caller signature")
	// ErrMalformed is wrapped when a call carries some of the entries but
	// not all, one of them more than once, or one that is not well formed.
	ErrMalformed = errors.New("callauth: malformed caller signature")
	// ErrBadSignature is wrapped when the signature does not verify.
	ErrBadSignature = errors.New("callauth: bad caller signature")
	// ErrInvalidInput is wrapped when Sign or SignedBytes is given a field
	// the canonical form cannot hold (a method with a newline, a time
	// before 1970...).
	ErrInvalidInput = errors.New("callauth: invalid input")
)

// checkMethod checks the syntax of a method name.
func checkMethod(method string) error {
	if len(method) < MinMethodLen || len(method) > MaxMethodLen {
		return fmt.Errorf("method name of %d bytes (want %d to %d)", len(method), MinMethodLen, MaxMethodLen)
	}
	if method[0] != '/' {
		return errors.New(`method name does not begin with "/"`)
	}
	for i := 0; i < len(method); i++ {
		if c := method[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("method name: byte %d is not printable ASCII", i)
		}
	}
	return nil
}

// appendSigned appends the signed bytes to dst. The fields must be valid.
func appendSigned(dst []byte, method string, msgSHA256 *[sha256.Size]byte, caller string, timestampMs int64, nonce string) []byte {
	return appendCanonical(dst, Domain, method, msgSHA256, caller, timestampMs, nonce)
}

// appendCanonical appends the canonical form of a call under domain (its
// first line) to dst. The fields must be valid.
func appendCanonical(dst []byte, domain, method string, msgSHA256 *[sha256.Size]byte, caller string, timestampMs int64, nonce string) []byte {
	dst = append(dst, domain...)
	dst = append(dst, '\n')
	dst = append(dst, method...)
	dst = append(dst, '\n')
	dst = hex.AppendEncode(dst, msgSHA256[:])
	dst = append(dst, '\n')
	dst = append(dst, caller...)
	dst = append(dst, '\n')
	dst = strconv.AppendInt(dst, timestampMs, 10)
	dst = append(dst, '\n')
	dst = append(dst, nonce...)
	return dst
}

// signedLen is an upper bound of the signed bytes' length for a method of
// the longest length; what Verify builds fits a buffer of it on the stack.
const signedLen = len(Domain) + 1 + MaxMethodLen + 1 + 2*sha256.Size + 1 + CallerIDLen + 1 + MaxTimestampDigits + 1 + NonceLen

// SignedBytes returns the signed bytes of a call (see the package
// documentation): method, the request message bytes msg, the caller's key
// id, the timestamp in Unix milliseconds and the nonce. It checks every
// field (an error wraps ErrInvalidInput). It is the reference for other
// implementations and tests; Sign and Verify build the same bytes.
func SignedBytes(method string, msg []byte, caller string, timestampMs int64, nonce string) ([]byte, error) {
	if err := checkFields(method, caller, timestampMs, nonce); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(msg)
	return appendSigned(make([]byte, 0, signedLen), method, &sum, caller, timestampMs, nonce), nil
}

func checkFields(method, caller string, timestampMs int64, nonce string) error {
	if err := checkMethod(method); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidInput, err)
	}
	if err := checkHex(caller, CallerIDLen); err != nil {
		return fmt.Errorf("%w: caller: %v", ErrInvalidInput, err)
	}
	if timestampMs < 0 || timestampMs > maxTimestamp {
		return fmt.Errorf("%w: timestamp %d ms is outside 0 to %d", ErrInvalidInput, timestampMs, int64(maxTimestamp))
	}
	if err := checkHex(nonce, NonceLen); err != nil {
		return fmt.Errorf("%w: nonce: %v", ErrInvalidInput, err)
	}
	return nil
}

// Sign signs a call of method whose request message bytes are msg, at time
// now, with a fresh random nonce, and returns the four metadata entries to
// send with it. msg must be exactly the bytes the call sends (see
// UnaryClientInterceptor, which sees to it).
func Sign(id *Identity, method string, msg []byte, now time.Time) (metadata.MD, error) {
	if id == nil {
		return nil, errors.New("callauth: sign: nil identity")
	}
	var raw [NonceLen / 2]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("callauth: nonce: %w", err)
	}
	nonce := hex.EncodeToString(raw[:])
	ts := now.UnixMilli()
	caller := id.KeyID()
	if err := checkFields(method, caller, ts, nonce); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(msg)
	var buf [signedLen]byte
	sig, err := id.sign(appendSigned(buf[:0], method, &sum, caller, ts, nonce))
	if err != nil {
		return nil, err
	}
	return metadata.MD{
		MDCaller:    {caller},
		MDTimestamp: {strconv.FormatInt(ts, 10)},
		MDNonce:     {nonce},
		MDSignature: {string(sig)},
	}, nil
}

// Claims are the parsed entries of a signed call or a session call: who
// claims to call, when, with which nonce and signature (or session ticket
// and MAC). Nothing in them is proven until Verify (or VerifySession)
// succeeds.
type Claims struct {
	caller    string
	nonce     string
	ts        int64
	session   bool // a session call: sig is the MAC
	sigLen    uint8
	sig       [MaxSignatureLen]byte
	ticketLen uint8
	ticket    [TicketLen]byte
}

// ParseMetadata parses the entries of a signed call or a session call
// from the call's incoming metadata. Each must be present exactly once
// and well formed (see the package documentation); a call carries either
// a signature or a session ticket and MAC, never both. A call with none
// of the entries is anonymous: the error wraps ErrMissing. Any other
// problem wraps ErrMalformed and names the entry. Errors never quote the
// values. On success it allocates only the Claims.
func ParseMetadata(md metadata.MD) (*Claims, error) {
	caller, nc := md[MDCaller]
	ts, nt := md[MDTimestamp]
	nonce, nn := md[MDNonce]
	sig, ns := md[MDSignature]
	tk, nk := md[MDSession]
	mac, nm := md[MDMAC]
	if !nc && !nt && !nn && !ns && !nk && !nm {
		return nil, fmt.Errorf("%w: the call carries none of %s, %s, %s, %s (or %s, %s)", ErrMissing, MDCaller, MDTimestamp, MDNonce, MDSignature, MDSession, MDMAC)
	}
	if ns && (nk || nm) {
		return nil, fmt.Errorf("%w: the call carries both a signature (%s) and a session (%s, %s)", ErrMalformed, MDSignature, MDSession, MDMAC)
	}
	if err := one(MDCaller, caller); err != nil {
		return nil, err
	}
	if err := checkHex(caller[0], CallerIDLen); err != nil {
		return nil, malformed(MDCaller, err)
	}
	if err := one(MDTimestamp, ts); err != nil {
		return nil, err
	}
	t, err := parseTimestamp(ts[0])
	if err != nil {
		return nil, malformed(MDTimestamp, err)
	}
	if err := one(MDNonce, nonce); err != nil {
		return nil, err
	}
	if err := checkHex(nonce[0], NonceLen); err != nil {
		return nil, malformed(MDNonce, err)
	}
	if nk || nm {
		if err := one(MDSession, tk); err != nil {
			return nil, err
		}
		if n := len(tk[0]); n != TicketLen {
			return nil, malformed(MDSession, fmt.Errorf("%d bytes (want %d)", n, TicketLen))
		}
		if err := one(MDMAC, mac); err != nil {
			return nil, err
		}
		if n := len(mac[0]); n != MACLen {
			return nil, malformed(MDMAC, fmt.Errorf("%d bytes (want %d)", n, MACLen))
		}
		c := &Claims{caller: caller[0], nonce: nonce[0], ts: t, session: true}
		c.sigLen = uint8(copy(c.sig[:], mac[0]))
		c.ticketLen = uint8(copy(c.ticket[:], tk[0]))
		return c, nil
	}
	if err := one(MDSignature, sig); err != nil {
		return nil, err
	}
	if n := len(sig[0]); n == 0 || n > MaxSignatureLen {
		return nil, malformed(MDSignature, fmt.Errorf("%d bytes (want 1 to %d)", n, MaxSignatureLen))
	}
	c := &Claims{caller: caller[0], nonce: nonce[0], ts: t}
	c.sigLen = uint8(copy(c.sig[:], sig[0]))
	return c, nil
}

// IsSession reports whether the call is authenticated by a session
// (VerifySession) rather than signed (Verify).
func (c *Claims) IsSession() bool { return c.session }

func one(name string, v []string) error {
	switch len(v) {
	case 1:
		return nil
	case 0:
		return fmt.Errorf("%w: %s is missing", ErrMalformed, name)
	default:
		return fmt.Errorf("%w: %s is given %d times (want once)", ErrMalformed, name, len(v))
	}
}

func malformed(name string, err error) error {
	return fmt.Errorf("%w: %s: %v", ErrMalformed, name, err)
}

// checkHex checks that s is n lower-case hex digits.
func checkHex(s string, n int) error {
	if len(s) != n {
		return fmt.Errorf("%d characters (want %d lower-case hex digits)", len(s), n)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("character %d is not a lower-case hex digit", i)
		}
	}
	return nil
}

// parseTimestamp parses 1 to MaxTimestampDigits decimal digits without a
// sign or a leading zero.
func parseTimestamp(s string) (int64, error) {
	if len(s) == 0 || len(s) > MaxTimestampDigits {
		return 0, fmt.Errorf("%d characters (want 1 to %d decimal digits)", len(s), MaxTimestampDigits)
	}
	if s[0] == '0' && len(s) > 1 {
		return 0, errors.New("leading zero")
	}
	var v int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("character %d is not a decimal digit", i)
		}
		v = v*10 + int64(c-'0') // at most 15 digits: no overflow
	}
	return v, nil
}

// Caller is the key id the call claims to come from.
func (c *Claims) Caller() string { return c.caller }

// Time is when the caller says it signed the call.
func (c *Claims) Time() time.Time { return time.UnixMilli(c.ts) }

// TimestampMillis is the timestamp as sent: Unix time in milliseconds.
func (c *Claims) TimestampMillis() int64 { return c.ts }

// Nonce is the call's nonce, 32 lower-case hex digits.
func (c *Claims) Nonce() string { return c.nonce }

// Verify checks that pub signed these claims for a call of method whose
// request message bytes are msg (exactly as received: see the package
// documentation). An error wraps ErrBadSignature when the signature does
// not verify, or pub is not the caller the claims name. It does not check
// the time or the nonce: ReplayCache.Check does, after Verify.
func (c *Claims) Verify(pub Caller, method string, msg []byte) error {
	sum := sha256.Sum256(msg)
	return c.VerifyDigest(pub, method, sum)
}

// VerifyDigest is Verify for a caller that hashed the request message
// bytes already: msgSHA256 is their SHA-256.
func (c *Claims) VerifyDigest(pub Caller, method string, msgSHA256 [sha256.Size]byte) error {
	if c == nil {
		return fmt.Errorf("%w: no claims", ErrBadSignature)
	}
	if c.session {
		return fmt.Errorf("%w: a session call carries a MAC, not a signature", ErrBadSignature)
	}
	if pub.id == "" {
		return fmt.Errorf("%w: no public key to verify caller %s with", ErrBadSignature, c.caller)
	}
	if pub.id != c.caller {
		return fmt.Errorf("%w: the call names caller %s, the key given is %s", ErrBadSignature, c.caller, pub.id)
	}
	if err := checkMethod(method); err != nil {
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	var buf [signedLen]byte
	signed := appendSigned(buf[:0], method, &msgSHA256, c.caller, c.ts, c.nonce)
	sig := c.sig[:c.sigLen]
	switch {
	case pub.ed != nil:
		if len(sig) != ed25519.SignatureSize {
			return fmt.Errorf("%w: caller %s: an Ed25519 signature is %d bytes, not %d", ErrBadSignature, c.caller, ed25519.SignatureSize, len(sig))
		}
		if !ed25519.Verify(pub.ed, signed, sig) {
			return fmt.Errorf("%w: caller %s, %s", ErrBadSignature, c.caller, method)
		}
	case pub.ec != nil:
		digest := sha256.Sum256(signed)
		if !ecdsa.VerifyASN1(pub.ec, digest[:], sig) {
			return fmt.Errorf("%w: caller %s, %s", ErrBadSignature, c.caller, method)
		}
	default:
		return fmt.Errorf("%w: caller %s: no public key", ErrBadSignature, c.caller)
	}
	return nil
}

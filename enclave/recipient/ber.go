package recipient

import (
	"encoding/asn1"
	"fmt"
)

// A minimal BER reader (X.690): definite and indefinite lengths, primitive
// and constructed strings, single-byte tags: what a CMS EnvelopedData
// holds. encoding/asn1 reads DER only.

const (
	constructed    = 0x20
	tagInteger     = 0x02
	tagOctetString = 0x04
	tagOID         = 0x06
	tagSequence    = 0x30
	tagSet         = 0x31
	maxDepth       = 16
)

// contextTag is the constructed context-specific tag [n].
func contextTag(n byte) byte { return 0xa0 | n }

// node is one decoded element: content for a primitive one, kids for a
// constructed one.
type node struct {
	tag     byte
	content []byte
	kids    []*node
}

// parse reads one element from b and returns it and what follows.
func parse(b []byte, depth int) (*node, []byte, error) {
	if depth > maxDepth {
		return nil, nil, fmt.Errorf("%w: nested deeper than %d", ErrMalformed, maxDepth)
	}
	if len(b) < 2 {
		return nil, nil, fmt.Errorf("%w: truncated element", ErrMalformed)
	}
	tag := b[0]
	if tag&0x1f == 0x1f {
		return nil, nil, fmt.Errorf("%w: multi-byte tag", ErrMalformed)
	}
	b = b[1:]
	l := int(b[0])
	b = b[1:]
	n := &node{tag: tag}
	isConstructed := tag&constructed != 0
	switch {
	case l == 0x80: // indefinite: constructed only, children up to end-of-contents
		if !isConstructed {
			return nil, nil, fmt.Errorf("%w: indefinite length on a primitive element", ErrMalformed)
		}
		for {
			if len(b) >= 2 && b[0] == 0 && b[1] == 0 {
				return n, b[2:], nil
			}
			kid, rest, err := parse(b, depth+1)
			if err != nil {
				return nil, nil, err
			}
			n.kids = append(n.kids, kid)
			b = rest
		}
	case l > 0x80:
		k := l & 0x7f
		if k > 3 || len(b) < k {
			return nil, nil, fmt.Errorf("%w: length of %d bytes", ErrMalformed, k)
		}
		l = 0
		for _, c := range b[:k] {
			l = l<<8 | int(c)
		}
		b = b[k:]
	}
	if l > len(b) {
		return nil, nil, fmt.Errorf("%w: element of %d bytes with %d left", ErrMalformed, l, len(b))
	}
	body, rest := b[:l], b[l:]
	if !isConstructed {
		n.content = body
		return n, rest, nil
	}
	for len(body) > 0 {
		kid, r, err := parse(body, depth+1)
		if err != nil {
			return nil, nil, err
		}
		n.kids = append(n.kids, kid)
		body = r
	}
	return n, rest, nil
}

// all returns n's children after checking its tag.
func (n *node) all(tag byte, what string) ([]*node, error) {
	if n.tag != tag {
		return nil, fmt.Errorf("%w: %s has tag %#x, want %#x", ErrMalformed, what, n.tag, tag)
	}
	return n.kids, nil
}

// children is all, with exactly count children.
func (n *node) children(tag byte, count int, what string) ([]*node, error) {
	k, err := n.all(tag, what)
	if err != nil {
		return nil, err
	}
	if len(k) != count {
		return nil, fmt.Errorf("%w: %s has %d fields, want %d", ErrMalformed, what, len(k), count)
	}
	return k, nil
}

// oid decodes an OBJECT IDENTIFIER.
func (n *node) oid(what string) (asn1.ObjectIdentifier, error) {
	if n.tag != tagOID || len(n.content) == 0 || len(n.content) > 64 {
		return nil, fmt.Errorf("%w: %s is not an object identifier", ErrMalformed, what)
	}
	der := append([]byte{tagOID, byte(len(n.content))}, n.content...)
	var o asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(der, &o); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("%w: %s is not an object identifier", ErrMalformed, what)
	}
	return o, nil
}

// smallInt decodes a non-negative INTEGER below 128.
func (n *node) smallInt(what string) (int, error) {
	if n.tag != tagInteger || len(n.content) != 1 || n.content[0] >= 0x80 {
		return 0, fmt.Errorf("%w: %s is not a small integer", ErrMalformed, what)
	}
	return int(n.content[0]), nil
}

// octets decodes an OCTET STRING, primitive or in segments.
func (n *node) octets(what string) ([]byte, error) {
	if n.tag&^constructed != tagOctetString {
		return nil, fmt.Errorf("%w: %s is not an octet string", ErrMalformed, what)
	}
	return n.bytes(what)
}

// bytes is the content of a string element whatever its tag: primitive,
// or constructed of primitive OCTET STRING segments (BER).
func (n *node) bytes(what string) ([]byte, error) {
	if n.tag&constructed == 0 {
		return n.content, nil
	}
	var out []byte
	for _, k := range n.kids {
		if k.tag != tagOctetString {
			return nil, fmt.Errorf("%w: %s has a segment with tag %#x", ErrMalformed, what, k.tag)
		}
		out = append(out, k.content...)
	}
	return out, nil
}

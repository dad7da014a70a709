-- The demo table config/producer.toml streams (docker-compose runs this once, on an
-- empty PostgreSQL volume; scripts/stack creates the same table locally).
CREATE TABLE IF NOT EXISTS public.orders (
  id bigserial PRIMARY KEY,
  customer text NOT NULL,
  status text NOT NULL DEFAULT 'new',
  total numeric(12,2) NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.orders (customer, total)
SELECT 'customer-' || g, g * 10.5 FROM generate_series(1, 5) g
WHERE NOT EXISTS (SELECT 1 FROM public.orders);
